"""float32 and int8 side by side: the same prompts, methods and machine, one command.

    python experiments/precision_compare.py --out docs/results/precision-compare \
        --ids spec-bench/81,spec-bench/91,... --profile docs/results/profile-qwen2.5-coder-int8.json

Runs `adaspec bench` twice, one after the other (never at once: two torch jobs on a small CPU slow
each other many times over), into OUT/float32 and OUT/int8, then writes OUT/report.md with
tokens/s of every method at both precisions, each method's speedup over `ar` and over transformers'
assisted generation at the same precision, the end-to-end speedup of each adaspec int8 method over
transformers' assisted generation with float32 models, and the target's cost of a 5-token forward
relative to a 1-token one from each run's measured cost model.

The int8 run may take a calibration profile (made for the int8 pair); the float32 run never does, so
its calibrated methods run on their documented fallbacks and are labelled so.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from adaspec.bench.report import Run, machine_line
from adaspec.calibration.cost import CostModel

FLOAT32_METHODS = "ar,hf-ar,hf-assisted,fixed-k4,cmasd,cost-aware,ngram"
INT8_METHODS = "ar,hf-ar,hf-assisted,fixed-k4,cmasd,entropy-calibrated,cost-aware,multi-draft-calibrated,ngram"


def bench(precision: str, a: argparse.Namespace) -> Path:
    out = Path(a.out) / precision
    methods = a.float32_methods if precision == "float32" else a.int8_methods
    cmd = ["adaspec", "bench", "--suite", "spec-bench", "--ids", a.ids, "--max-new-tokens", str(a.max_new_tokens),
           "--threads", str(a.threads), "--methods", methods, "--out", str(out), "--quiet", "--no-plots"]
    for flag in ("target", "drafter"):
        if getattr(a, flag):
            cmd += [f"--{flag}", getattr(a, flag)]
    if precision == "int8":
        cmd += ["--quant", "int8"] + (["--profile", a.profile] if a.profile else [])
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def tps(run: Run, method: str) -> float | None:
    rows = run.prompts.get(method)
    return statistics.fmean(r["tokens_per_s"] for r in rows.values()) if rows else None


def identical(run: Run, method: str) -> str:
    s = run.summary(method)
    return f"{s.identical}/{s.n}" if s else "—"


def cost_ratio(run: Run) -> str:
    cm = run.meta.get("cost_model")
    if not cm:
        return "—"
    model = CostModel({int(n): ms for n, ms in cm["target_ms"].items()}, cm.get("drafter_ms_per_token"), "", 0)
    return f"{model.target_cost(5) / model.target_cost(1):.2f}x (1 token {model.target_cost(1):.1f} ms; drafter {cm.get('drafter_ms_per_token') or 0:.1f} ms/token)"


def render(runs: dict[str, Run], command: str) -> str:
    f32, i8 = runs["float32"], runs["int8"]
    methods = list(dict.fromkeys(f32.methods + i8.methods))
    hf32 = tps(f32, "hf-assisted")
    lines = [
        "# float32 and int8 side by side (Spec-Bench subset)", "",
        f"Command: `{command}`", "",
        f"Machine: {machine_line(i8.meta)}. Target {i8.meta['target']['name']}, drafter "
        f"{i8.meta['drafter']['name']}; prompts: {', '.join(sorted(i8.prompts.get('ar', {})))}; "
        f"{i8.meta['max_new_tokens']} new tokens, greedy. tok/s = new tokens / wall time including prefill, "
        "mean over prompts. The float32 run has no calibration profile: its `cost-aware` runs on the built-in "
        "fallback costs.", "",
        "| method | float32 tok/s | x ar | x hf-assisted | int8 tok/s | x ar | x hf-assisted | "
        "x hf-assisted float32 (end to end) | identical to ar (f32 / int8) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        row = [f"`{m}`"]
        for run in (f32, i8):
            t, ar, hf = tps(run, m), tps(run, "ar"), tps(run, "hf-assisted")
            row += [f"{t:.2f}" if t else "—", f"{t / ar:.2f}" if t and ar else "—", f"{t / hf:.2f}" if t and hf else "—"]
        t8 = tps(i8, m)
        row.append(f"{t8 / hf32:.2f}" if t8 and hf32 else "—")
        row.append(f"{identical(f32, m)} / {identical(i8, m)}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Target forward over 5 new tokens relative to 1 (measured cost model, 4 and 8 measured, 5 "
              f"interpolated): float32 {cost_ratio(f32)}; int8 {cost_ratio(i8)}.", "",
              "Per-run reports with per-subtask tables: `float32/report.md`, `int8/report.md`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ids", required=True, help="comma-separated Spec-Bench record ids, the same for both runs")
    p.add_argument("--profile", default=None, help="calibration profile of the int8 pair")
    p.add_argument("--target", default=None, help="target model (default: adaspec's default pair)")
    p.add_argument("--drafter", default=None, help="drafter model (default: adaspec's default pair)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--float32-methods", default=FLOAT32_METHODS)
    p.add_argument("--int8-methods", default=INT8_METHODS)
    p.add_argument("--report-only", action="store_true", help="only rewrite report.md from finished runs")
    a = p.parse_args(argv)
    command = shlex.join(["python", "experiments/precision_compare.py"] + (argv if argv is not None else sys.argv[1:]))
    runs = {}
    for precision in ("float32", "int8"):
        out = Path(a.out) / precision if a.report_only else bench(precision, a)
        runs[precision] = Run(out)
    report = Path(a.out) / "report.md"
    report.write_text(render(runs, command))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
