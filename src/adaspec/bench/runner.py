"""Run benchmark methods over prompt records: interleaved, warmed up, resumable, with quality.

The protocol (Spec-Bench's, plus what timing on a shared CPU needs):
- every method sees the same prompt ids; prompts run in order, and within a prompt the methods
  run in turn (ar, A, B, ar, A, B, ... with repeats) so that drift of the machine (other jobs,
  clocks, thermals) hits every method alike;
- one short warm-up generation per method is run and discarded before anything is timed;
- torch's thread count is fixed for the whole run and recorded;
- each finished (prompt, method, repeat) is appended to `records.jsonl` at once, and a restarted
  run skips the ones already there (delete a line to re-run just that one);
- `run.json` holds the machine, versions, models and checksums, the command, the cost model and
  the start and end of every session.

`ar` always runs (it is added first when not asked for): it is the speedup baseline, the
reference for the lossless check and for token agreement, and the oracle's knowledge.
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from adaspec.bench import methods as M
from adaspec.bench.datasets import Record
from adaspec.calibration.cost import fitting_prompt_len, measure
from adaspec.calibration.identity import machine_info, model_info, versions
from adaspec.config import AdaspecError

RECORDS_FILE, RUN_FILE = "records.jsonl", "run.json"
REFERENCE_SUBTASKS = ("translation", "summarization", "rag", "gsm8k", "math_reasoning")
ANSWER_SUBTASKS = ("gsm8k", "math_reasoning")
WARMUP_TOKENS = 8
SETTINGS_KEYS = ("target", "drafter", "max_new_tokens", "options", "chat", "profile", "head")  # must match to resume


def prompt_text(record: Record) -> str | list[dict]:
    """What is sent for a record (Engine.encode takes it): Spec-Bench's first turn as it is, a
    prompt file's text or chat messages as written; GSM8K and HumanEval get the one instruction
    their answer extraction relies on."""
    if "messages" in record.extra:
        return record.extra["messages"]
    if record.suite == "gsm8k":
        return f"{record.prompt}\nSolve it step by step, then end with: The answer is <number>."
    if record.suite == "humaneval":
        return ("Complete the following Python function. Reply with the whole function in one ```python "
                f"code block.\n\n```python\n{record.prompt}```")
    return record.prompt


def run_bench(engine, records: list[Record], methods: list[str], *, max_new_tokens: int, out_dir: str | Path,
              warmup: bool = True, repeats: int = 1, options: dict | None = None, threads: int | None = None,
              trace: bool = True, cost_model: bool = True, command: str | None = None,
              progress: bool = True, log=print) -> Path:
    """Run `methods` (labels, see bench.methods) on every record; returns out_dir.

    options: knob options for `adaspec.api.make_config` shared by every method (the run's layer;
        method defaults sit below it, label overrides above); max_new_tokens is set here.
    trace: record per-token signals and accept flags of the speculative methods (for the
        calibration and trace plots). It adds a few host reads per step to every such method.
    """
    if repeats < 1 or max_new_tokens < 1:
        raise AdaspecError("repeats and max_new_tokens must be >= 1")
    if not records:
        raise AdaspecError("no prompts to run: check --suite and --limit")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or torch.get_num_threads())  # fixed for the whole run
    options = {k: v for k, v in (options or {}).items() if k != "trace"}
    options["max_new_tokens"] = max_new_tokens

    labels = list(dict.fromkeys(["ar", *[m.strip() for m in methods if m.strip()]]))
    plan, skipped = _plan(engine, labels, options)
    for label, why in skipped.items():
        log(f"skipping {label}: {why}")

    meta = _start_session(out, engine, records, plan, skipped, options, repeats, warmup, command)
    if cost_model and "cost_model" not in meta:
        log("measuring the cost model ...")
        meta["cost_model"] = measure_cost(engine)
        _write_json(out / RUN_FILE, meta)

    done = {_key(r): r for r in read_rows(out / RECORDS_FILE)}
    todo = [(rec, rep, label) for rec in records for rep in range(repeats) for label in plan
            if (rec.id, label, rep) not in done]
    if todo and warmup:
        _warmup(engine, records, plan, options, log)

    from tqdm.auto import tqdm

    total = len(records) * repeats * len(plan)
    bar = tqdm(total=total, initial=total - len(todo), unit="gen", desc="bench", disable=not progress,
               dynamic_ncols=True)
    passes: dict[tuple[str, str], dict] = {}  # (record id, text) -> pass@1, shared by identical outputs
    with open(out / RECORDS_FILE, "a", encoding="utf-8") as f:
        for rec in records:
            if not any((rec.id, label, rep) not in done for rep in range(repeats) for label in plan):
                continue
            ids = engine.encode(prompt_text(rec))
            for rep in range(repeats):
                for label in plan:
                    key = (rec.id, label, rep)
                    if key in done:
                        continue
                    bar.set_postfix_str(f"{rec.id} {label}", refresh=False)
                    ar = done.get((rec.id, "ar", rep))
                    row = _run_one(engine, rec, ids, label, plan[label], rep, ar, trace, passes)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    done[key] = row
                    bar.update()
    bar.close()
    meta["sessions"][-1]["end"] = _now()
    _write_json(out / RUN_FILE, meta)
    return out


# ---- planning and run metadata ------------------------------------------------------------------

def _plan(engine, labels: list[str], options: dict) -> tuple[dict[str, tuple], dict[str, str]]:
    """label -> (BenchMethod, options it runs with); and label -> why it is skipped."""
    plan, skipped = {}, {}
    for label in labels:
        method, opts = M.check_label(label, options)
        if method.needs_drafter and engine.drafter is None:
            skipped[label] = "needs a drafter model (--drafter)"
            continue
        if method.check is not None:
            try:
                method.check(engine)
            except M.MethodSkipped as e:
                skipped[label] = str(e)
                continue
        plan[label] = (method, opts)
    return plan, skipped


def _start_session(out: Path, engine, records, plan, skipped, options, repeats, warmup, command) -> dict:
    path = out / RUN_FILE
    settings = {"target": model_info(engine.target, engine.target_name),
                "drafter": model_info(engine.drafter, engine.drafter_name) if engine.drafter is not None else None,
                "max_new_tokens": options["max_new_tokens"], "options": _jsonable(options), "chat": engine.chat,
                "profile": _jsonable(engine.profile.knobs()) if engine.profile is not None else None,
                "head": engine.head.identity() if getattr(engine, "head", None) is not None else None}
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if meta:
        for key in SETTINGS_KEYS:
            if _comparable(meta.get(key)) != _comparable(settings[key]):
                raise AdaspecError(f"{out} holds a run with different {key} ({meta.get(key)!r} there, "
                                   f"{settings[key]!r} now): resuming would mix them; use another --out "
                                   "or delete that folder")
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    meta.update(settings)
    meta.setdefault("created", _now())
    meta["command"] = command
    meta["machine"] = machine_info()
    meta["versions"] = versions()
    meta["repeats"], meta["warmup"] = repeats, warmup
    meta["methods"] = list(dict.fromkeys([*meta.get("methods", []), *plan]))
    meta["skipped_methods"] = skipped
    meta["method_options"] = {**meta.get("method_options", {}),
                              **{label: _jsonable(o) for label, (_, o) in plan.items()}}
    meta["records"] = list(dict.fromkeys([*meta.get("records", []), *(r.id for r in records)]))
    if "hf-assisted" in plan:
        meta["hf_assisted"] = M.hf_assisted_defaults(M.hf_model(engine.drafter, "drafter"))
    meta.setdefault("sessions", []).append({"start": _now(), "end": None, "command": command})
    _write_json(path, meta)
    return meta


def measure_cost(engine, prompt_len: int = 200, new_tokens=(1, 2, 4, 8, 16), repeats: int = 5) -> dict:
    """The target's ms per forward over 1, 2, 4, 8, 16 new tokens and the drafter's ms per token
    (calibration.cost.measure), as run.json records them."""
    try:
        cost = measure(engine.target, engine.drafter, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    except AdaspecError as e:
        return {"error": str(e)}
    return {"target_ms": cost.to_dict()["target_ms"], "drafter_ms_per_token": cost.drafter_ms_per_token,
            "prompt_len": fitting_prompt_len(engine.target, prompt_len, new_tokens), "repeats": repeats,
            "threads": cost.threads}


# ---- one generation -------------------------------------------------------------------------------

def _warmup(engine, records, plan, options, log) -> None:
    """One short generation per method, discarded: first-call costs stay out of the timings."""
    for rec in records:
        try:
            ids = engine.encode(prompt_text(rec))
            ref = None
            for label, (method, opts) in plan.items():
                short = {**opts, "max_new_tokens": min(WARMUP_TOKENS, opts["max_new_tokens"])}
                ctx = M.MethodContext(engine, ids, short, reference_ids=ref)
                r = method.fn(ctx)
                if label == "ar":
                    ref = r.token_ids
            return
        except AdaspecError:
            continue  # e.g. a prompt longer than a toy model's context: warm up on the next one
    log("warm-up failed on every prompt; timings of the first generations include start-up costs")


def _run_one(engine, rec: Record, ids: list[int], label: str, planned, rep: int, ar: dict | None,
             trace: bool, passes: dict) -> dict:
    method, opts = planned
    row = {"record_id": rec.id, "suite": rec.suite, "subtask": rec.subtask, "category": rec.category,
           "method": label, "base_method": method.name, "repeat": rep, "prompt_tokens": len(ids),
           "greedy": not opts.get("temperature"), "error": None}
    ref_ids = ar["token_ids"] if ar is not None and not ar.get("error") else None
    try:
        if method.needs_reference and ref_ids is None:
            raise AdaspecError("needs the `ar` output of this prompt, which failed")
        r = method.fn(M.MethodContext(engine, ids, dict(opts), reference_ids=ref_ids, trace=trace))
    except AdaspecError as e:  # a prompt too long for the model, a method that cannot run: recorded, not fatal
        row["error"] = str(e)
        return row
    text = engine.tokenizer.decode(r.token_ids) if engine.tokenizer is not None else None
    row.update(new_tokens=r.new_tokens, wall_s=r.wall_s, tokens_per_s=r.new_tokens / r.wall_s if r.wall_s > 0 else 0.0,
               finish_reason=r.finish_reason, lossless=r.lossless, token_ids=r.token_ids, text=text,
               stats=r.stats, info=r.info or None,
               quality=compare_to_ar(r.token_ids, ref_ids if label != "ar" else r.token_ids),
               task=task_metrics(rec, text, passes),
               reference=rec.reference if rec.subtask in REFERENCE_SUBTASKS or rec.suite == "prompts" else None,
               trace=compact_trace(r.trace) if r.trace else None)
    return row


def compare_to_ar(ids: list[int], ar_ids: list[int] | None) -> dict | None:
    """Whether an output equals ar's, and how far they agree token by token."""
    if ar_ids is None:
        return None
    from adaspec.bench.metrics import token_agreement

    a = token_agreement(ids, ar_ids)
    return {"identical": list(ids) == list(ar_ids), "agreement": a.match_rate, "common_prefix": a.common_prefix}


def task_metrics(rec: Record, text: str | None, passes: dict | None = None) -> dict | None:
    """Per-record task quality: the extracted answer (GSM8K, math_reasoning) or pass@1 (HumanEval).
    BLEU and ROUGE are corpus metrics: the report computes them from text and reference."""
    if text is None:
        return None
    from adaspec.bench import metrics

    if rec.subtask in ANSWER_SUBTASKS or "answer" in rec.extra:
        pred = metrics.extract_answer(text)
        ref = rec.extra.get("answer", rec.reference if isinstance(rec.reference, str) else None)
        return {"answer": pred, "correct": metrics.answers_match(pred, ref)}
    if rec.subtask == "humaneval":
        key = (rec.id, text)
        if passes is None or key not in passes:
            ok, why = metrics.pass_at_1(metrics.extract_code(text), rec)
            result = {"passed": ok, "reason": why}
            if passes is None:
                return result
            passes[key] = result
        return passes[key]
    return None


def compact_trace(trace) -> dict:
    """Per-step draft length and accepted count, and per drafted token its signals and verdict."""
    cols = {name: [] for name in ("k", "n_accepted", "step", "entropy", "c_ent", "c_logit", "c_soft",
                                  "confidence", "tau", "accepted")}
    for i, s in enumerate(trace):
        n = s.accepted.index(False) if False in s.accepted else len(s.accepted)
        cols["k"].append(s.k)
        cols["n_accepted"].append(n)
        for j in range(s.k):
            cols["step"].append(i)
            for name in ("entropy", "c_ent", "c_logit", "c_soft", "confidence", "tau"):
                cols[name].append(round(getattr(s, name)[j], 5))
            cols["accepted"].append(int(s.accepted[j]))
    return cols


# ---- files -------------------------------------------------------------------------------------------

def read_rows(path: str | Path) -> list[dict]:
    """The rows of a records.jsonl. Every row is written with its newline in one call, so a last
    line without one was cut short by a killed run: it is dropped, and cut off the file so that
    the next append starts on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    *lines, tail = raw.split(b"\n")
    if tail:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(tail))
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise AdaspecError(f"{path}, line {n}: not JSON; fix or delete that line") from None
    return rows


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(run.json, rows of records.jsonl) of a benchmark folder."""
    run_dir = Path(run_dir)
    if not (run_dir / RECORDS_FILE).is_file():
        raise AdaspecError(f"{run_dir} has no {RECORDS_FILE}: is it the --out folder of `adaspec bench`?")
    meta = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    return meta, read_rows(run_dir / RECORDS_FILE)


def _key(row: dict) -> tuple[str, str, int]:
    return row["record_id"], row["method"], int(row.get("repeat", 0))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


def _comparable(value):
    """Settings as they compare across sessions: ignore the fields that only describe, not decide."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in ("parameters", "adapter")}
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

