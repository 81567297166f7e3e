"""`adaspec bench`, `adaspec sweep` and `adaspec diagnose`: thin shells over bench.runner and bench.report."""

from __future__ import annotations

import argparse

from adaspec.cli import add_model_args, add_option_args, load_engine, option_values

# The side-by-side set of the committed reports: plain decoding in both engines, llama.cpp's and
# transformers' speculation, the best fixed k, the calibrated methods and the oracle's bound.
DEFAULT_METHODS = ("ar,llamacpp-ar,llamacpp-spec,hf-assisted,fixed-k2,fixed-k4,cost-aware,multi-draft-calibrated,oracle,"
                   "head,head-lookup")  # the head methods run where a head is loaded (the default target ships one)
BENCH_MAX_NEW_TOKENS = 256  # long enough that decoding, not prefill, dominates the time


def register(sub) -> None:
    from adaspec.bench.datasets import SPEC_BENCH_SUBTASKS, SUITES

    b = sub.add_parser("bench", help="benchmark methods on Spec-Bench, GSM8K or HumanEval",
                       description="Run methods prompt by prompt (interleaved, warmed up, resumable) and write "
                                   "records.jsonl, run.json, report.md and plots to --out.")
    _common(b, SUITES, SPEC_BENCH_SUBTASKS)
    b.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods: ar, hf-ar, hf-assisted, fixed-kN, heuristic, confidence-stop, cmasd, "
                        "cmasd-k, cmasd-tau (lossy, tau_base 0.1 unless --tau-base), entropy, oracle, any preset; "
                        f"knob overrides as name:knob=value (default {DEFAULT_METHODS})")
    b.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="run a knob grid and plot the speed-quality Pareto frontier",
                       description="Run one method over a grid of knob values (plus ar) on a small prompt set and "
                                   "write sweep.md and sweep_*.png (speedup against agreement with ar and task "
                                   "metric).")
    _common(s, SUITES, SPEC_BENCH_SUBTASKS, limit=1)
    s.add_argument("--grid", nargs="+", required=True, metavar="KNOB=V1,V2",
                   help="grid axes, e.g. alpha=0.5,1.0 gamma=0.5,1,2 tau_base=0.05,0.1,0.2 k_max=4,8 beta=1,2")
    s.set_defaults(func=cmd_sweep)

    d = sub.add_parser("diagnose", help="name the failure signatures of a benchmark run and the knob to turn",
                       description="Read a bench folder: high rollback rate, no speedup, quality loss in lossy "
                                   "modes, lossless mismatches. Exit status 1 when a lossless mismatch (a bug) is "
                                   "found.")
    d.add_argument("run_dir", help="the --out folder of `adaspec bench` or `adaspec sweep`")
    d.add_argument("--rollback-limit", type=float, default=0.4, help="flag rollback rates above this (default 0.4)")
    d.add_argument("--waste-limit", type=float, default=0.05,
                   help="flag those rollback rates only when drafting the rejected tokens took more than this "
                        "share of the time (default 0.05)")
    d.add_argument("--agreement-floor", type=float, default=0.95,
                   help="flag lossy methods agreeing with ar on fewer tokens than this (default 0.95)")
    d.set_defaults(func=cmd_diagnose)


def _common(p: argparse.ArgumentParser, suites, subtasks, limit: int | None = None) -> None:
    p.add_argument("--suite", choices=suites, default="spec-bench", help="prompt suite (default spec-bench)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="your own prompts instead of a suite: JSONL with `prompt` or chat `messages`, optional `id`, "
                        "`category` (the report groups by it), `reference`, `answer` (docs/benchmarks.md)")
    p.add_argument("--limit", type=int, default=limit,
                   help="prompts per subtask for spec-bench (six subtasks), in all for the others "
                        f"(default {'all' if limit is None else limit})")
    p.add_argument("--subtasks", default=None, help=f"spec-bench only: comma-separated subset of {', '.join(subtasks)}")
    p.add_argument("--ids", default=None,
                   help="comma-separated record ids (e.g. spec-bench/81,spec-bench/91): run exactly these prompts, "
                        "to compare with another run on the same prompts")
    p.add_argument("--out", required=True, help="output folder; an existing run there is resumed")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method (default 1)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the discarded warm-up runs")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="do not record per-token traces (no calibration or trace plots; saves a few host reads "
                        "per step)")
    p.add_argument("--no-cost-model", dest="cost_model", action="store_false", help="skip measuring the cost model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    add_option_args(p)
    for action in p._actions:  # the shared --method does not apply to bench; sweep uses it
        if action.dest == "method":
            action.help = ("method whose knobs `sweep` varies (default cmasd)" if p.prog.endswith("sweep")
                           else argparse.SUPPRESS)
        if action.dest == "max_new_tokens":
            action.help = f"new tokens per prompt (default {BENCH_MAX_NEW_TOKENS})"


def run_options(a: argparse.Namespace) -> dict:
    """The knobs given on the command line: the run's options. Left-out knobs stay unset, so that a
    method's own defaults (cmasd-tau's tau_base) and a profile's knobs apply; a given one always wins."""
    opts = option_values(a)
    opts.pop("max_new_tokens", None)
    return opts


def max_new_tokens(a: argparse.Namespace) -> int:
    return a.max_new_tokens if a.max_new_tokens is not None else BENCH_MAX_NEW_TOKENS


def _records(a: argparse.Namespace, exclude: set[str] = frozenset()):
    """The evaluation records: --limit per subtask, never a prompt the profile was calibrated on."""
    from adaspec.bench.datasets import _first_per_subtask, load_spec_bench, load_suite
    from adaspec.config import AdaspecError

    if a.subtasks and (a.suite != "spec-bench" or a.prompts):
        raise AdaspecError("--subtasks applies to --suite spec-bench only")
    if a.prompts:
        from adaspec.bench.datasets import load_prompts

        records = load_prompts(a.prompts)
    elif a.suite == "spec-bench":
        subtasks = [s.strip() for s in a.subtasks.split(",")] if a.subtasks else None
        records = load_spec_bench(subtasks=subtasks)
    else:
        records = load_suite(a.suite)
    records = [r for r in records if r.id not in exclude]
    if getattr(a, "ids", None):
        wanted = [i.strip() for i in a.ids.split(",") if i.strip()]
        by_id = {r.id: r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise AdaspecError(f"unknown or excluded record id(s): {', '.join(missing)}")
        return [by_id[i] for i in wanted]
    if a.limit is None:
        return records
    if a.suite != "spec-bench":
        return records[: a.limit]
    return _first_per_subtask(records, a.limit)  # MT-bench: round-robin over its categories


def _calibration_ids(profile) -> set[str]:
    """Every prompt id named in a profile's data record (fit, held-out and transfer prompts)."""
    found: set[str] = set()

    def walk(x):
        if isinstance(x, str) and "/" in x:
            found.add(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(getattr(profile, "data", {}) if profile is not None else {})
    return found


def _run(a: argparse.Namespace, methods: list[str]):
    from adaspec.bench.runner import run_bench

    engine = load_engine(a)
    exclude = _calibration_ids(engine.profile)
    records = _records(a, exclude)
    if exclude and not a.quiet:
        print(f"bench: {len(exclude)} calibration prompts of the profile are excluded from evaluation")
    return run_bench(engine, records, methods, max_new_tokens=max_new_tokens(a), out_dir=a.out, warmup=a.warmup,
                     repeats=a.repeats, options=run_options(a), threads=a.threads, trace=a.trace,
                     cost_model=a.cost_model, progress=not a.quiet)


def _check_labels(a: argparse.Namespace, labels: list[str]) -> None:
    """Unknown names and out-of-range values fail here, before any model loads."""
    from adaspec.bench import methods as M

    for label in labels:
        M.check_label(label, {**run_options(a), "max_new_tokens": max_new_tokens(a)})


def cmd_bench(a: argparse.Namespace) -> int:
    from adaspec.bench.diagnose import diagnose, render_diagnosis
    from adaspec.bench.report import Run, write_report

    labels = [m.strip() for m in a.methods.split(",") if m.strip()]
    _check_labels(a, labels)
    out = _run(a, labels)
    report = write_report(out)
    print(f"wrote {report}")
    if a.plots:
        from adaspec.bench.plots import write_plots

        for path in write_plots(out):
            print(f"wrote {path}")
    run = Run(out)
    print(render_diagnosis(run, diagnose(run)))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from adaspec.bench import methods as M
    from adaspec.bench.report import write_report
    from adaspec.bench.sweep import write_sweep

    grid = M.parse_grid(a.grid)
    method = a.method or "cmasd"
    labels = M.grid_labels(method, grid)
    _check_labels(a, labels)
    print(f"sweeping {len(labels)} grid points of {method} (plus ar)")
    out = _run(a, labels)
    print(f"wrote {write_sweep(out, labels, grid)}")
    print(f"wrote {write_report(out)}")
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    from adaspec.bench.diagnose import diagnose, render_diagnosis
    from adaspec.bench.report import Run

    run = Run(a.run_dir)
    findings = diagnose(run, rollback_limit=a.rollback_limit, waste_limit=a.waste_limit,
                        agreement_floor=a.agreement_floor)
    print(render_diagnosis(run, findings))
    return 1 if any(f.kind == "bug" for f in findings) else 0
