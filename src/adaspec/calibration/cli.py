"""`adaspec calibrate` (fit a pair's profile) and `adaspec trace` (plot one generation's regimes)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from adaspec.cli import add_model_args, add_option_args, load_engine, option_values
from adaspec.config import AdaspecError


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="fit a calibration profile for a target/drafter pair",
                       description="Run the pair on calibration prompts with a generous fixed draft, log every "
                                   "judged draft token, fit the acceptance model, lambdas, the entropy threshold and "
                                   "skip_entropy, measure the cost model, and write a profile JSON "
                                   "(docs/calibration.md).")
    add_model_args(c)
    c.add_argument("--suite", default="spec-bench", help="prompt suite: spec-bench, gsm8k or humaneval")
    c.add_argument("--limit", type=int, default=4,
                   help="calibration prompts per subtask, from the calibration side of the split (default 4)")
    c.add_argument("--calib-fraction", type=float, default=0.25,
                   help="share of each subtask on the calibration side of bench.datasets.split; the rest is "
                        "for evaluation and never used here (default 0.25)")
    c.add_argument("--split-seed", type=int, default=0, help="seed of the calibration/evaluation split (default 0)")
    c.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    c.add_argument("--k-max", type=int, default=8, help="fixed draft length of the logging run (default 8)")
    c.add_argument("--held-out", type=float, default=0.25,
                   help="share of the fitting prompts held out for goodness-of-fit figures (default 0.25)")
    c.add_argument("--transfer-subtask", default="auto",
                   help="subtask kept out of the fit to report transfer figures: a name, `auto` (math_reasoning "
                        "when present, else the last subtask; none when there is only one) or `none`")
    c.add_argument("--cost-repeats", type=int, default=5, help="timed forwards per cost-model point (default 5)")
    c.add_argument("--out", default="profile.json", help="where to write the profile (default profile.json)")
    c.add_argument("--raw", action="store_true", help="send prompts without the chat template")
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("trace", help="plot one generation's entropy, confidence, regime, drafter and k",
                       description="Generate once with tracing and plot per drafted token its normalised entropy "
                                   "against the regime threshold, its confidence C, accept/reject, and per step the "
                                   "drafter used and k.")
    t.add_argument("--prompt", required=True, help="prompt text, or - to read it from standard input")
    add_model_args(t)
    add_option_args(t)  # includes --profile
    t.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    t.add_argument("--out", default="trace.png", help="image to write (default trace.png)")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the trace and stats as JSON")
    t.set_defaults(func=cmd_trace)


def calibration_records(suite: str, limit: int | None, fraction: float, seed: int):
    """The first `limit` records per subtask of the calibration side of the split, and all records."""
    from adaspec.bench.datasets import load_suite, split

    records = load_suite(suite)
    calib, _ = split(records, fraction, seed=seed)
    per: dict[str, int] = defaultdict(int)
    chosen = []
    for r in calib:
        if limit is None or per[r.subtask] < limit:
            per[r.subtask] += 1
            chosen.append(r)
    if not chosen:
        raise AdaspecError(f"no calibration prompts: raise --calib-fraction (now {fraction})")
    return chosen


def pick_transfer(records, choice: str) -> str | None:
    subtasks = list(dict.fromkeys(r.subtask for r in records))
    if choice == "none" or len(subtasks) < 2:
        return None
    if choice == "auto":
        return "math_reasoning" if "math_reasoning" in subtasks else subtasks[-1]
    return choice


def cmd_calibrate(a: argparse.Namespace) -> int:
    import torch

    from adaspec.bench.runner import prompt_text
    from adaspec.calibration.fit import calibrate

    if a.limit is not None and a.limit < 1:
        raise AdaspecError("--limit must be >= 1")
    records = calibration_records(a.suite, a.limit, a.calib_fraction, a.split_seed)
    engine = load_engine(a)
    transfer = pick_transfer(records, a.transfer_subtask)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"calibrating {engine.target_name} + {engine.drafter_name} on {len(records)} {a.suite} prompts "
        f"(transfer subtask: {transfer or 'none'}), {a.max_new_tokens} tokens each, k = {a.k_max}")
    data = {"suite": a.suite, "split": {"calib_fraction": a.calib_fraction, "seed": a.split_seed},
            "limit_per_subtask": a.limit, "transfer_subtask": transfer, "threads": torch.get_num_threads(),
            "command": "adaspec " + " ".join(sys.argv[1:])}
    profile, _ = calibrate(engine, records, max_new_tokens=a.max_new_tokens, k_max=a.k_max, held_out=a.held_out,
                           transfer_subtask=transfer, prompt_text=prompt_text, cost_repeats=a.cost_repeats,
                           data=data, log=log)
    profile.save(a.out)
    print(summary(profile))
    print(f"profile written to {a.out}; use it with --profile {a.out} and a calibrated method "
          f"(entropy-calibrated, cost-aware, multi-draft-calibrated)")
    return 0


def summary(profile) -> str:
    """A few lines: fitted knobs and goodness of fit per split."""
    w = ", ".join(f"{x:.3f}" for x in profile.acceptance.weights)
    lines = [f"acceptance model: sigmoid({profile.acceptance.intercept:.3f} + [{w}] . (c_ent, c_logit, c_soft))",
             f"lambdas {tuple(round(x, 3) for x in profile.lambdas)} | entropy threshold "
             f"{profile.entropy_threshold:.3f} | skip_entropy {profile.skip_entropy:.3f}",
             "cost: target ms " + ", ".join(f"{n}:{ms:.1f}" for n, ms in profile.cost.target_ms.items())
             + f" | drafter ms/token {profile.cost.drafter_ms_per_token or 0:.1f}"]
    for role, f in profile.fit.items():
        if f.get("n"):
            auc = "n/a" if f["auc"] is None else f"{f['auc']:.3f}"
            lines.append(f"{role:9s} n={f['n']:5d} base rate {f['base_rate']:.3f} log-loss {f['log_loss']:.3f} "
                         f"AUC {auc} Brier {f['brier']:.3f}")
    return "\n".join(lines)


def cmd_trace(a: argparse.Namespace) -> int:
    from adaspec.calibration.regimes import plot_regimes

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    engine = load_engine(a)
    opts = option_values(a)
    method = a.method or engine.default_method
    r = engine.generate(prompt, method=method, trace=True, **opts)
    if r.trace is None or not r.trace:
        raise AdaspecError(f"method {method!r} produced no trace (plain decoding has no drafts)")
    profile = engine.profile
    s = r.stats
    title = (f"{engine.target_name} + {engine.drafter_name}, {method}\n{s.new_tokens} tokens, "
             f"{s.mean_accepted:.2f} per target forward, acceptance {s.acceptance_rate:.0%}")
    out = plot_regimes(r.trace, a.out, entropy_threshold=r.spec.entropy_threshold, title=title,
                       acceptance=profile.acceptance if profile is not None else None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r.to_dict(), f, indent=1)
    print(f"trace of {len(r.trace)} steps written to {out}", file=sys.stderr)
    return 0
