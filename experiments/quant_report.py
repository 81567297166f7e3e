"""float32 vs int8 on CPU: forward cost, greedy agreement, perplexity, and losslessness of speculation.

    python experiments/quant_report.py --out docs/results/quant-cpu.md

For each model (target and drafter): forward ms for n new tokens after a 200-token prompt
(`adaspec.calibration.cost.forward_cost`, median of --repeats), greedy output of int8 against float32 on
a few chat prompts (share of identical tokens, common-prefix length), and perplexity on a held
paragraph. For the target, int8 with the LM head kept in float32 too. Finally greedy speculative
decoding with the int8 pair against greedy autoregressive decoding of the int8 target (must be
identical). Prints a markdown report with the command line and machine, and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from adaspec.api import make_config
from adaspec.calibration.cost import CostModel, forward_cost
from adaspec.calibration.identity import machine_name
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.models.quant import activation_levels, quantize_adapter

PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Explain in three sentences what a hash map is and when to use one.",
    "Write a SQL query that returns the three most recent orders of every customer.",
)

# Written for this benchmark (not from any training set we know of): ~300 tokens of prose and code.
HELD_TEXT = """\
The lighthouse keeper kept two notebooks. In the first he wrote the weather every four hours: wind \
direction, a guess at its speed, the height of the swell, and whether the lamp had needed cleaning. \
In the second he wrote down the ships he saw, their colours and the direction they were heading, \
and on quiet nights a few lines about what he imagined they were carrying. When the supply boat came \
on the first Monday of each month, he handed the first notebook to the skipper and kept the second \
for himself. Years later, his granddaughter found the second notebook in a biscuit tin and decided to \
check his guesses against the old harbour records.

She wrote a small program to do it:

def match_sightings(sightings, records, window_hours=6):
    \"\"\"Pair each sighting with the closest recorded departure within the window.\"\"\"
    matches = []
    for seen in sightings:
        best = None
        for rec in records:
            gap = abs((rec.departed - seen.time).total_seconds()) / 3600
            if gap <= window_hours and (best is None or gap < best[0]):
                best = (gap, rec)
        matches.append((seen, best[1] if best else None))
    return matches

Out of four hundred and twelve sightings, she matched three hundred and five to a real ship. He had \
guessed the cargo right more often than chance would allow, which she found harder to explain.
"""


def load(name: str, dtype: torch.dtype):
    """(adapter, tokenizer) through the registry (converted cache), else straight from the GGUF."""
    try:
        from adaspec.models.registry import load_pretrained as registry_load

        return registry_load(name, dtype=dtype)
    except ImportError:
        from adaspec.models.hf import load_hf

        folder = Path.home() / ".cache" / "adaspec" / name
        return load_hf(str(next(folder.glob("*.gguf"))), dtype=dtype)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def greedy(adapter, prompts: list[list[int]], n: int) -> list[list[int]]:
    cfg = make_config("ar", max_new_tokens=n, ignore_eos=True)
    return [generate_ids(adapter, None, p, cfg).token_ids for p in prompts]


def perplexity(adapter, ids: list[int]) -> float:
    adapter.reset()
    logits = adapter.extend(torch.tensor(ids)).double()  # (T, V)
    adapter.reset()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return float(nll.exp())


def agreement(ref: list[list[int]], out: list[list[int]]) -> tuple[float, list[int]]:
    """Share of positions with the same token, and the common-prefix length of each output."""
    same = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o))
    prefixes = []
    for r, o in zip(ref, out):
        k = 0
        while k < min(len(r), len(o)) and r[k] == o[k]:
            k += 1
        prefixes.append(k)
    return same / sum(len(r) for r in ref), prefixes


def measure_variant(adapter, label: str, prompts, held, args, ref=None) -> dict:
    t0 = time.perf_counter()
    row = {"label": label, "load_before": load_avg()}
    row["ms"] = forward_cost(adapter, args.prompt_len, tuple(args.new_tokens), args.repeats) if args.timing else None
    row["load_after"] = load_avg()
    if args.quality:
        row["outputs"] = greedy(adapter, prompts, args.gen_tokens)
        row["ppl"] = perplexity(adapter, held)
        if ref is not None:
            row["agree"], row["prefixes"] = agreement(ref, row["outputs"])
    print(f"  {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return row


def run_model(name: str, args, tokenizer_prompts=None) -> tuple[list[dict], object, object]:
    """float32, int8 with the LM head in float32 (if --head-check) and int8 rows for one model;
    returns the rows, the int8 adapter and (tokenizer, prompt ids)."""
    print(f"{name}: loading float32", file=sys.stderr, flush=True)
    adapter, tok = load(name, torch.float32)
    prompts = tokenizer_prompts or [tok.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    held = tok.encode(HELD_TEXT)
    rows = [measure_variant(adapter, "float32", prompts, held, args)]
    ref = rows[0].get("outputs")
    quant_s = 0.0
    if args.head_check:  # in place, in two stages: no second copy of the float model in memory
        t0 = time.perf_counter()
        quantize_adapter(adapter, "int8", lm_head=False)
        quant_s = time.perf_counter() - t0
        rows.append(measure_variant(adapter, "int8, LM head float32", prompts, held, args, ref))
        rows[-1]["quant_s"] = quant_s
    t0 = time.perf_counter()
    quantize_adapter(adapter, "int8")  # after the stage above, only the LM head is left to convert
    rows.append(measure_variant(adapter, "int8", prompts, held, args, ref))
    rows[-1]["quant_s"] = quant_s + time.perf_counter() - t0
    for r in rows:
        r["model"], r["held_tokens"] = name, len(held)
    return rows, adapter, (tok, prompts)


def lossless_check(target, drafter, prompts, args) -> list[dict]:
    """Greedy speculative (fixed k) with the int8 pair vs greedy autoregressive int8 target."""
    out = []
    ar_cfg = make_config("ar", max_new_tokens=args.gen_tokens, ignore_eos=True)
    for k in args.spec_k:
        cfg = make_config("fixed", max_new_tokens=args.gen_tokens, ignore_eos=True, k=k)
        same, t_ar, t_sp, drafted, accepted = 0, 0.0, 0.0, 0, 0
        for p in prompts:
            t0 = time.perf_counter()
            ar = generate_ids(target, None, p, ar_cfg)
            t1 = time.perf_counter()
            sp = generate_ids(target, ModelDrafter(drafter), p, cfg)
            t2 = time.perf_counter()
            same += ar.token_ids == sp.token_ids
            t_ar, t_sp = t_ar + t1 - t0, t_sp + t2 - t1
            drafted, accepted = drafted + sp.stats.drafted, accepted + sp.stats.accepted
        out.append({"k": k, "identical": same, "n": len(prompts), "ar_tps": args.gen_tokens * len(prompts) / t_ar,
                    "spec_tps": args.gen_tokens * len(prompts) / t_sp, "load": load_avg(),
                    "acceptance": accepted / drafted if drafted else 0.0})
    return out


def machine_lines(args) -> list[str]:
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), None)
    except OSError:
        model = None
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags) or "?"
    return [
        f"- CPU: {model or machine_name()} ({os.cpu_count()} logical cores; {isa})",
        f"- torch threads: {torch.get_num_threads()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}",
        f"- int8 kernels: fbgemm (torch's default quantised engine here: {torch.backends.quantized.engine}); "
        f"activations 0..{activation_levels()} per row",
    ]


def report(args, rows: list[dict], spec: list[dict], started: str, ended: str) -> str:
    ns = args.new_tokens
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = ["# float32 vs int8 on CPU", "", f"Made by `{cmd}`", "", "Machine:", "", *machine_lines(args),
             f"- load average (1, 5, 15 min) at start: {started}; at end: {ended} (the machine is shared: "
             "other jobs ran during these measurements)", ""]
    if args.timing:
        lines += [f"## Forward time (ms, median of {args.repeats}) for n new tokens after a "
                  f"{args.prompt_len}-token prompt", "",
                  "| model | weights | " + " | ".join(f"n={n}" for n in ns) + " | n=1 -> n=4 | load avg around it |",
                  "|---|---|" + "---|" * len(ns) + "---|---|"]
        for r in rows:
            ms = r["ms"]
            lines.append(f"| {r['model']} | {r['label']} | " + " | ".join(f"{ms[n]:.1f}" for n in ns)
                         + (f" | x{ms[4] / ms[1]:.2f}" if 4 in ms and 1 in ms else " | ")
                         + f" | {r['load_before']} / {r['load_after']} |")
        lines.append("")
    if not args.quality:
        return "\n".join(lines)
    lines += [f"## Quality against float32 ({len(PROMPTS)} chat prompts x {args.gen_tokens} greedy tokens; "
              "perplexity on a held paragraph)", "",
              "| model | weights | identical tokens | common prefix per prompt | perplexity | quantise s |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        agree = f"{100 * r['agree']:.1f}%" if "agree" in r else "(reference)"
        pref = ", ".join(map(str, r["prefixes"])) if "prefixes" in r else "-"
        qs = f"{r['quant_s']:.0f}" if "quant_s" in r else "-"
        lines.append(f"| {r['model']} | {r['label']} | {agree} | {pref} | {r['ppl']:.3f} "
                     f"({r['held_tokens']} tokens) | {qs} |")
    lines.append("")
    if spec:
        lines += [f"## Greedy speculative (int8 drafter, fixed k) vs greedy autoregressive int8 target, "
                  f"{args.gen_tokens} tokens", "",
                  "| k | identical outputs | acceptance | AR tokens/s | speculative tokens/s | load avg |",
                  "|---|---|---|---|---|---|"]
        for s in spec:
            lines.append(f"| {s['k']} | {s['identical']}/{s['n']} | {100 * s['acceptance']:.0f}% "
                         f"| {s['ar_tps']:.1f} | {s['spec_tps']:.1f} "
                         f"| {s['load']} |")
        lines.append("")
    lines += ["Generated outputs are the chat prompts above through each model's chat template; "
              "identical tokens = share of the positions where int8 and float32 chose the same token "
              "(positions after the first difference count too, though their contexts differ).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--spec-k", type=int, nargs="*", default=[4])
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--no-quality", dest="quality", action="store_false",
                    help="forward times only: no greedy outputs, perplexity or speculative check")
    ap.add_argument("--no-head-check", dest="head_check", action="store_false",
                    help="skip the int8 variant that keeps the LM head in float32")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--cost-json", default=None,
                    help="save the int8 target's (and drafter's) measured CostModel here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = load_avg()
    rows, target, (tok, prompts) = run_model(args.target, args)
    drafter = None
    if args.drafter:
        saved, args.head_check = args.head_check, False  # the head question is asked of the target
        drows, drafter, _ = run_model(args.drafter, args, tokenizer_prompts=prompts)
        args.head_check = saved
        rows += drows
    check = drafter is not None and args.spec_k and args.quality
    spec = lossless_check(target, drafter, prompts, args) if check else []
    text = report(args, rows, spec, started, load_avg())
    if args.cost_json and args.timing:
        t_ms = next(r["ms"] for r in rows if r["model"] == args.target and r["label"] == "int8")
        d_ms = next((r["ms"][1] for r in rows if r["model"] == args.drafter and r["label"] == "int8"
                     and 1 in r["ms"]), None)
        cost = CostModel(t_ms, d_ms, machine_name(), torch.get_num_threads())
        Path(args.cost_json).write_text(json.dumps(cost.to_dict(), indent=1) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
