"""The benchmark report: speed, quality, the CM-ASD ablation and the cost model, from records.jsonl.

Speedup is given two ways, over the prompts both a method and `ar` finished:
- paired: the mean over prompts of (method tok/s / ar tok/s) on the same prompt;
- Spec-Bench: mean method tok/s / mean ar tok/s (each mean over prompts), as Spec-Bench's
  evaluation/speed.py computes it.
tok/s of a prompt is its new tokens over the wall time of the whole generation (prefill included);
with repeats the median wall time is used.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from adaspec.bench.runner import read_run

REPORT_FILE = "report.md"
ABLATION = ("fixed", "cmasd-k", "cmasd-tau", "cmasd")  # base methods of the CM-ASD ablation
SUBTASK_ORDER = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "gsm8k", "humaneval")


OLD_KEYS = {"target_s": "verify_s"}  # Stats fields under their names in records written before a rename

@dataclass
class Summary:
    """One method over one set of prompts (those it and `ar` both finished)."""

    method: str
    n: int  # prompts compared
    tokens_per_s: float  # mean over prompts of new tokens / wall seconds
    decode_tokens_per_s: float | None  # the same without the prefill (None: not measured, e.g. hf-*)
    first_token_s: float | None  # mean seconds to the first committed tokens, prefill included
    ar_tokens_per_s: float  # the same, for ar on the same prompts
    speedup_paired: float  # mean over prompts of tok/s method / tok/s ar
    speedup_specbench: float  # mean tok/s method / mean tok/s ar
    mean_accepted: float | None  # new tokens per target forward (None: not measured, e.g. hf-*)
    acceptance: float | None  # accepted / drafted tokens
    rollback: float | None  # share of steps that rejected a draft token
    shares: dict | None  # share of generation time in drafting / the target's forwards / policy overhead
    identical: int  # outputs identical to ar
    agreement: float  # mean token agreement with ar
    lossless: bool
    greedy: bool


class Run:
    """A benchmark folder's rows, merged over repeats: run.prompts[method][record id] -> row."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.meta, self.rows = read_run(self.dir)
        self.errors = [r for r in self.rows if r.get("error")]
        by: dict[str, dict[str, list[dict]]] = {}
        for r in self.rows:
            if not r.get("error"):
                by.setdefault(r["method"], {}).setdefault(r["record_id"], []).append(r)
        self.prompts = {m: {rid: _merge(rs) for rid, rs in recs.items()} for m, recs in by.items()}
        order = self.meta.get("methods", [])
        self.methods = sorted(self.prompts, key=lambda m: (order.index(m) if m in order else len(order), m))
        self.subtasks = sorted({r["subtask"] for r in self.rows},
                               key=lambda s: (SUBTASK_ORDER.index(s) if s in SUBTASK_ORDER else 99, s))

    def summary(self, method: str, subtask: str | None = None) -> Summary | None:
        mine, ar = self.prompts.get(method, {}), self.prompts.get("ar", {})
        ids = [i for i in mine if i in ar and (subtask is None or mine[i]["subtask"] == subtask)]
        if not ids:
            return None
        tps = [mine[i]["tokens_per_s"] for i in ids]
        tps_ar = [ar[i]["tokens_per_s"] for i in ids]
        stats = [mine[i]["stats"] for i in ids if mine[i].get("stats")]
        total = lambda key: sum(s[key] if key in s else s[OLD_KEYS[key]] for s in stats)  # noqa: E731
        measured = len(stats) == len(ids)
        time_s = total("total_s") if measured else 0
        quality = [_compare(mine[i]["token_ids"], ar[i]["token_ids"]) for i in ids]
        decode = [s["new_tokens"] / (s["total_s"] - s["prefill_s"]) for s in stats
                  if "prefill_s" in s and s["total_s"] > s["prefill_s"]]
        first = [s["first_token_s"] for s in stats if s.get("first_token_s")]  # records before it have none
        return Summary(
            method=method, n=len(ids), tokens_per_s=statistics.fmean(tps), ar_tokens_per_s=statistics.fmean(tps_ar),
            decode_tokens_per_s=statistics.fmean(decode) if measured and len(decode) == len(stats) else None,
            first_token_s=statistics.fmean(first) if measured and len(first) == len(stats) else None,
            speedup_paired=statistics.fmean(a / b for a, b in zip(tps, tps_ar) if b > 0),
            speedup_specbench=statistics.fmean(tps) / statistics.fmean(tps_ar),
            mean_accepted=(total("new_tokens") / total("target_forwards")
                           if measured and total("target_forwards") else None),
            acceptance=total("accepted") / total("drafted") if measured and total("drafted") else None,
            rollback=total("rollbacks") / total("steps") if measured and total("drafted") else None,
            shares={k: total(f"{k}_s") / time_s for k in ("draft", "target", "policy")} if time_s > 0 else None,
            identical=sum(q[0] for q in quality), agreement=statistics.fmean(q[1] for q in quality),
            lossless=all(mine[i].get("lossless") for i in ids), greedy=all(mine[i].get("greedy", True) for i in ids))

    def task_quality(self, method: str) -> dict[str, float]:
        """Task metrics of a method's outputs: BLEU, ROUGE-1/2/L, answer accuracy, pass@1."""
        from adaspec.bench import metrics

        rows = list(self.prompts.get(method, {}).values())
        out: dict[str, float] = {}
        pick = lambda sub: [r for r in rows if r["subtask"] == sub and r.get("text") is not None]  # noqa: E731
        if tr := [r for r in pick("translation") if r.get("reference")]:
            out["BLEU (translation)"] = metrics.bleu([r["text"] for r in tr], [r["reference"] for r in tr])
        if sm := [r for r in pick("summarization") if r.get("reference")]:
            for kind, v in metrics.rouge([r["text"] for r in sm], [r["reference"] for r in sm]).items():
                out[f"{kind.upper().replace('ROUGE', 'ROUGE-')} (summarization)"] = 100 * v
        for sub in ("gsm8k", "math_reasoning"):
            if got := [r for r in pick(sub) if r.get("task")]:
                out[f"accuracy ({sub})"] = 100 * statistics.fmean(r["task"]["correct"] for r in got)
        if got := [r for r in pick("humaneval") if r.get("task")]:
            out["pass@1 (humaneval)"] = 100 * statistics.fmean(r["task"]["passed"] for r in got)
        own = [r for r in rows if r.get("suite") == "prompts" and r.get("text") is not None]  # --prompts FILE
        for cat in sorted({r["subtask"] for r in own}):
            mine = [r for r in own if r["subtask"] == cat]
            if refs := [r for r in mine if isinstance(r.get("reference"), str)]:
                out[f"ROUGE-L ({cat})"] = 100 * metrics.rouge([r["text"] for r in refs],
                                                              [r["reference"] for r in refs])["rougeL"]
            if got := [r for r in mine if r.get("task")]:
                out[f"accuracy ({cat})"] = 100 * statistics.fmean(r["task"]["correct"] for r in got)
        return out

    def runtime(self, method: str) -> str:
        """Which engine ran a method: "adaspec", "transformers" (hf-*) or "llama.cpp" (llamacpp-*)."""
        row = next(iter(self.prompts.get(method, {}).values()), None)
        recorded = ((row or {}).get("info") or {}).get("runtime")
        base = self.base_method(method)
        return recorded or ("transformers" if base.startswith("hf-") else
                            "llama.cpp" if base.startswith("llamacpp-") else "adaspec")

    def same_as(self, method: str, reference: str) -> tuple[int, int, float] | None:
        """(identical outputs, prompts compared, mean token agreement) of method against reference."""
        mine, ref = self.prompts.get(method, {}), self.prompts.get(reference, {})
        ids = [i for i in mine if i in ref]
        if not ids:
            return None
        q = [_compare(mine[i]["token_ids"], ref[i]["token_ids"]) for i in ids]
        return sum(x[0] for x in q), len(ids), statistics.fmean(x[1] for x in q)

    def option(self, method: str, knob: str, default=None):
        return self.meta.get("method_options", {}).get(method, {}).get(knob, default)

    def base_method(self, method: str) -> str:
        row = next(iter(self.prompts.get(method, {}).values()), None)
        return row["base_method"] if row else method.split(":")[0]


def _merge(rows: list[dict]) -> dict:
    """Repeats of one (prompt, method) -> one row: median wall time, counters summed."""
    if len(rows) == 1:
        return rows[0]
    row = dict(rows[0])
    row["wall_s"] = statistics.median(r["wall_s"] for r in rows)
    row["tokens_per_s"] = row["new_tokens"] / row["wall_s"] if row["wall_s"] > 0 else 0.0
    if all(r.get("stats") for r in rows):
        row["stats"] = {k: sum(r["stats"][k] for r in rows) for k, v in rows[0]["stats"].items()
                        if isinstance(v, (int, float))}
    return row


def _compare(ids: list[int], ar_ids: list[int]) -> tuple[bool, float]:
    from adaspec.bench.metrics import token_agreement

    return list(ids) == list(ar_ids), token_agreement(ids, ar_ids).match_rate


# ---- the markdown -----------------------------------------------------------------------------------

def write_report(run_dir: str | Path) -> Path:
    run = Run(run_dir)
    path = run.dir / REPORT_FILE
    path.write_text(render(run), encoding="utf-8")
    return path


def render(run: Run) -> str:
    meta = run.meta
    parts = ["# adaspec benchmark report", "", provenance(meta), "", "## Findings", ""]
    parts += [f"- {s}" for s in findings(run)] or ["- nothing notable."]
    parts += ["", "## Speed", "", header(meta), "", speed_table(run), "", _SPEED_LEGEND, "",
              "## Quality", "", header(meta), "", quality_table(run), "", _QUALITY_LEGEND]
    if ablation := ablation_table(run):
        parts += ["", "## CM-ASD ablation", "", header(meta), "", ablation, "", _ABLATION_LEGEND]
    parts += ["", "## Cost model", "", header(meta), "", cost_table(meta)]
    if notes := method_notes(run):
        parts += ["", "## Method settings", ""] + [f"- {n}" for n in notes]
    if run.errors:
        parts += ["", "## Errors", "", "| Method | Prompts | First error |", "|---|---|---|"]
        by: dict[str, list[dict]] = {}
        for r in run.errors:
            by.setdefault(r["method"], []).append(r)
        parts += [f"| {m} | {len(rs)} | {rs[0]['record_id']}: {rs[0]['error'][:160]} |" for m, rs in by.items()]
    return "\n".join(parts) + "\n"


def provenance(meta: dict) -> str:
    t, d = meta.get("target") or {}, meta.get("drafter") or {}
    sessions = meta.get("sessions", [])
    lines = [f"- command: `{meta.get('command', '?')}`", f"- machine: {machine_line(meta)}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
             f"- target: {_model_line(t)}", f"- drafter: {_model_line(d) if d else 'none'}",
             f"- max_new_tokens {meta.get('max_new_tokens')}, repeats {meta.get('repeats', 1)}, "
             f"warm-up {'on' if meta.get('warmup', True) else 'off'}, prompts {len(meta.get('records', []))}",
             "- sessions: " + "; ".join(f"{s['start']} to {s.get('end') or 'unfinished'}" for s in sessions)]
    if meta.get("skipped_methods"):
        lines += [f"- skipped {m}: {why}" for m, why in meta["skipped_methods"].items()]
    return "\n".join(lines)


def machine_line(meta: dict) -> str:
    m = meta.get("machine", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    cores = m.get("cores") or m.get("cpus", "?")
    return f"{m.get('cpu', '?')}, {cores} cores, torch threads {m.get('torch_threads', '?')}{gpu}"


def header(meta: dict) -> str:
    return f"_`{meta.get('command', '?')}` on {machine_line(meta)}_"


def _model_line(info: dict) -> str:
    extra = ", ".join(f"{k} {info[k]}" for k in ("dtype", "sha256") if info.get(k))
    return f"{info.get('name')}" + (f" ({extra})" if extra else "")


def _f(x, fmt: str = "{:.2f}", none: str = "—") -> str:
    return none if x is None else fmt.format(x)


def speed_table(run: Run) -> str:
    rows = ["| Subtask | Method | n | tok/s | decode tok/s | first token s | speedup (paired) | speedup (Spec-Bench) | "
            "accepted / fwd | acceptance | rollback | draft | target | policy |", "|---" * 14 + "|"]
    for sub in ["all", *run.subtasks]:
        for m in run.methods:
            s = run.summary(m, None if sub == "all" else sub)
            if s is None:
                continue
            sh = s.shares or {}
            rows.append(f"| {sub} | {m} | {s.n} | {s.tokens_per_s:.1f} | {_f(s.decode_tokens_per_s, '{:.1f}')} | "
                        f"{_f(s.first_token_s)} | {s.speedup_paired:.2f}x | "
                        f"{s.speedup_specbench:.2f}x | {_f(s.mean_accepted)} | {_f(s.acceptance, '{:.1%}')} | "
                        f"{_f(s.rollback, '{:.1%}')} | {_f(sh.get('draft'), '{:.0%}')} | "
                        f"{_f(sh.get('target'), '{:.0%}')} | {_f(sh.get('policy'), '{:.0%}')} |")
    return "\n".join(rows)


def quality_table(run: Run) -> str:
    task = {m: run.task_quality(m) for m in run.methods}
    cols = list(dict.fromkeys(k for q in task.values() for k in q))
    rows = ["| Method | lossless | identical to ar | token agreement | " + " | ".join(cols) + (" |" if cols else "|"),
            "|---" * (4 + len(cols)) + "|"]
    for m in run.methods:
        s = run.summary(m)
        if s is None:
            continue
        bug = s.lossless and s.greedy and s.identical < s.n and run.runtime(m) == "adaspec"
        same = f"{s.identical}/{s.n}" + (" **BUG**" if bug else "")
        cells = [_f(task[m].get(c), "{:.1f}") for c in cols]
        lossless = ("yes" if run.runtime(m) == "adaspec" else f"own ({run.runtime(m)})") if s.lossless else "no"
        rows.append(f"| {m} | {lossless} | {same} | {s.agreement:.1%} | " + " | ".join(cells)
                    + (" |" if cells else "|"))
    return "\n".join(rows)


def ablation_table(run: Run) -> str | None:
    members = [m for m in run.methods if run.base_method(m) in ABLATION]
    if len({run.base_method(m) for m in members}) < 2:
        return None
    rows = ["| Method | adaptive k | relaxed tau | k / k_max | tau_base | gamma | speedup (paired) | "
            "speedup (Spec-Bench) | accepted / fwd | acceptance | agreement with ar |", "|---" * 11 + "|"]
    for m in members:
        s, base = run.summary(m), run.base_method(m)
        adaptive, relaxed = base in ("cmasd-k", "cmasd"), base in ("cmasd-tau", "cmasd")
        k = run.option(m, "k_max", 8) if adaptive else run.option(m, "k", 4)
        tau = run.option(m, "tau_base", 0.0) if relaxed else 0.0
        rows.append(f"| {m} | {'yes' if adaptive else 'no'} | {'yes' if relaxed else 'no'} | {k} | "
                    f"{f'{tau:g}' if relaxed else '—'} | {run.option(m, 'gamma', 1.0) if relaxed else '—'} | "
                    f"{s.speedup_paired:.2f}x | {s.speedup_specbench:.2f}x | {_f(s.mean_accepted)} | "
                    f"{_f(s.acceptance, '{:.1%}')} | {s.agreement:.1%} |")
    if any(run.base_method(m) == "cmasd" and not run.option(m, "tau_base", 0.0) for m in members):
        rows += ["", "cmasd ran with tau_base = 0, which makes it cmasd-k; run `cmasd:tau_base=0.1` (or --tau-base 0.1) "
                     "to ablate the full method."]
    return "\n".join(rows)


def cost_table(meta: dict) -> str:
    cost = meta.get("cost_model")
    if not cost:
        return "not measured (run without --no-cost-model)."
    if "error" in cost:
        return f"not measured: {cost['error']}"
    ms = {int(n): v for n, v in cost["target_ms"].items()}
    rows = [f"Target forward after a {cost.get('prompt_len')}-token prompt (median of {cost.get('repeats')}):", "",
            "| new tokens n | target ms | x one-token forward |", "|---|---|---|"]
    rows += [f"| {n} | {v:.2f} | {v / ms[1]:.2f} |" for n, v in sorted(ms.items())]
    if cost.get("drafter_ms_per_token") is not None:
        d = cost["drafter_ms_per_token"]
        rows += ["", f"Drafter: {d:.2f} ms per token, c = drafter / target one-token forward = {d / ms[1]:.2f}."]
    return "\n".join(rows)


def method_notes(run: Run) -> list[str]:
    notes = []
    base_opts = run.meta.get("options", {})
    for m in run.methods:
        opts = run.meta.get("method_options", {}).get(m, {})
        own = {k: v for k, v in opts.items() if base_opts.get(k) != v}
        if own:
            notes.append(f"{m}: " + ", ".join(f"{k}={v}" for k, v in own.items()))
        if run.base_method(m) == "cmasd-tau" and opts.get("tau_base", 0) > 0:
            notes.append(f"{m} is LOSSY: it runs the relaxed CM-ASD verification with tau_base={opts['tau_base']} "
                         "(0.1 unless overridden); judge it by token agreement and task metrics, not identity.")
        if run.runtime(m) == "transformers" and (same := run.same_as(m, "ar")):
            notes.append(f"{m}: transformers' generate on the same models; it prefills the whole prompt in one "
                         "forward where adaspec prefills all but its last token, so a near-tie in the logits can "
                         f"make its greedy tokens differ from ar's (identical on {same[0]}/{same[1]} prompts).")
        if m == "hf-assisted" and run.meta.get("hf_assisted"):
            h = run.meta["hf_assisted"]
            refit = ("re-fitted during generation" if h.get("threshold_refit")
                     else "fixed: scikit-learn is not installed")
            notes.append(f"hf-assisted: transformers' defaults, {h.get('num_assistant_tokens')} assistant tokens, "
                         f"schedule {h.get('num_assistant_tokens_schedule')!r}, confidence threshold "
                         f"{h.get('assistant_confidence_threshold')} "
                         f"({refit}).")
        if m == "oracle":
            notes.append("oracle: an upper bound, not a method: it knows ar's output and drafts exactly as far as it "
                         "would be accepted.")
        if run.runtime(m) == "llama.cpp":
            notes.append(_llamacpp_note(run, m))
    return notes


def _llamacpp_note(run: Run, m: str) -> str:
    text = (f"{m}: llama.cpp through llama-cpp-python on the GGUF's own Q4_K_M weights, a different "
            "quantisation of the same model than adaspec's, so its tokens are not expected to equal ar's")
    if m == "llamacpp-spec":
        text += (" (llama.cpp's speculative-simple loop re-implemented on its C API, draft-simple defaults: "
                 "n_max 3, n_min 0, p_min 0; the binary is not part of llama-cpp-python)")
        if same := run.same_as(m, "llamacpp-ar"):
            text += (f"; identical to llamacpp-ar on {same[0]}/{same[1]} prompts, token agreement {same[2]:.1%} "
                     "(llama.cpp's batched logits are not bit-identical to its one-token ones)")
    return text + "."


def llamacpp_findings(run: Run) -> list[str]:
    """Where adaspec stands against plain llama.cpp on the same prompts, overall and per subtask."""
    out = []
    ours = [m for m in run.methods if run.runtime(m) == "adaspec" and run.base_method(m) != "oracle"
            and not m.startswith("hf-") and (s := run.summary(m)) is not None and s.lossless]
    for sub in ["all", *run.subtasks]:
        key = None if sub == "all" else sub
        base = run.summary("llamacpp-ar", key)
        mine = [s for m in ours if (s := run.summary(m, key)) is not None]
        if base is None or not mine:
            continue
        best = max(mine, key=lambda s: s.tokens_per_s)
        where = "overall" if key is None else f"on {sub}"
        line = (f"{where}: llamacpp-ar {base.tokens_per_s:.1f} tok/s; adaspec's fastest lossless method "
                f"{best.method} {best.tokens_per_s:.1f} tok/s = {best.tokens_per_s / base.tokens_per_s:.2f}x llama.cpp")
        if spec := run.summary("llamacpp-spec", key):
            line += f"; llamacpp-spec {spec.tokens_per_s:.1f} tok/s"
        if slow := [s for s in mine if s.tokens_per_s < base.tokens_per_s]:
            line += "; slower than plain llama.cpp: " + ", ".join(
                f"{s.method} {s.tokens_per_s / base.tokens_per_s:.2f}x" for s in slow)
        out.append(line + ".")
    return out


def findings(run: Run) -> list[str]:
    """Plain sentences: bugs, and where adaspec is slower than ar or than transformers' assisted decoding."""
    out = []
    for m in run.methods:
        s = run.summary(m)
        if s and s.lossless and s.greedy and s.identical < s.n and run.runtime(m) == "adaspec":
            out.append(f"**BUG**: {m} is lossless but its output differs from ar on {s.n - s.identical} of {s.n} "
                       "prompts (a near-tie in the logits can also do this in float32; rerun with --dtype float64 "
                       "to tell them apart).")
    out += llamacpp_findings(run)
    ours = [m for m in run.methods if m != "ar" and not m.startswith("hf-") and run.base_method(m) != "oracle"
            and run.runtime(m) == "adaspec"]
    for sub in ["all", *run.subtasks]:
        where = "overall" if sub == "all" else f"on {sub}"
        key = None if sub == "all" else sub
        hf = run.summary("hf-assisted", key)
        mine = [s for m in ours if (s := run.summary(m, key)) is not None]
        if slow := [s for s in mine if s.speedup_specbench < 1]:
            out.append(f"slower than ar {where}: " + ", ".join(
                f"{s.method} {s.speedup_specbench:.2f}x" for s in slow) + " (Spec-Bench speedup).")
        if hf is not None and (behind := [s for s in mine if s.speedup_specbench < hf.speedup_specbench]):
            out.append(f"slower than hf-assisted ({hf.speedup_specbench:.2f}x) {where}: " + ", ".join(
                f"{s.method} {s.speedup_specbench:.2f}x" for s in behind) + ".")
    hf_ar = run.summary("hf-ar")
    if hf_ar is not None and hf_ar.speedup_specbench > 1.05:
        out.append(f"transformers' plain generate (hf-ar) is {hf_ar.speedup_specbench:.2f}x as fast as adaspec's ar "
                   "loop: speedups over ar are measured against the slower baseline.")
    for m in run.methods:
        if (s := run.summary(m)) and not s.lossless and run.runtime(m) == "adaspec":
            out.append(f"{m} is lossy: {s.agreement:.1%} token agreement with ar, {s.identical}/{s.n} outputs "
                       "identical.")
    return out


_SPEED_LEGEND = """tok/s: new tokens / wall seconds per prompt (prefill included), averaged over prompts. decode
tok/s: the same without the prefill of both models. first token s: seconds to the first committed tokens
(prefill and first step), what a streaming user waits.
speedup (paired): mean over prompts of tok/s(method) / tok/s(ar) on the same prompt. speedup (Spec-Bench):
mean tok/s(method) / mean tok/s(ar). accepted / fwd: new tokens per target forward (accepted drafts + the
corrected or bonus token; ar = 1). acceptance: accepted / drafted tokens. rollback: share of steps that
rejected a draft token. draft / target / policy: share of generation time spent in drafter forwards, target
forwards, and signals, policy and verification-rule bookkeeping (the rest is prefill). — = not measured
(transformers' generate) or nothing drafted."""

_QUALITY_LEGEND = """identical to ar: outputs equal to ar's token for token (a lossless adaspec method must reach
n/n under greedy decoding; anything less is flagged **BUG**; "own": lossless against another engine's own
plain decoding, see Method settings). token agreement: mean share of positions where the
method's token equals ar's. Task metrics are in percent (BLEU on its 0-100 scale) over that suite's prompts."""

_ABLATION_LEGEND = """fixed: fixed k, exact verification. cmasd-k: confidence-adaptive k, exact verification. cmasd-tau:
fixed k, confidence-relaxed verification (lossy when tau_base > 0). cmasd: both (lossless when tau_base = 0,
when it equals cmasd-k)."""
