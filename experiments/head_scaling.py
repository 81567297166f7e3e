"""What more data would buy the draft head: its held-out agreement against the answers it was trained
on, and the tokens per target forward and decode speedup a given agreement buys on this machine.

    python experiments/head_scaling.py

Two halves, both from committed measurements (nothing is trained or timed here):

1. **Agreement against data.** The three rounds of training on the target's own answers
   (docs/results/draft-head: 753, 1,128 and 1,913 answers, each round fine-tuning the previous head)
   give the held-out top-1 agreement of the first and second drafted token, the training minutes
   and the scored positions. A line in log(answers) is fitted through them (least squares), and,
   as a pessimistic reading, the slope of the last two rounds alone.
2. **What an agreement buys.** A head whose drafted tokens are each accepted with probability a
   (independently: optimistic, the measured second-token agreement is lower than the first) drafts
   the length k that `policies/cost.best_draft` picks on the shipped q4k profile's target cost T(n),
   at the head's measured price (`--head-cost`, a fraction of T(1)). A step then commits
   E = 1 + a + ... + a^k tokens in T(k + 1) + k * D, so decoding runs E * T(1) / (T(k + 1) + k * D)
   times faster than plain decoding. The model is checked against the shipped head's measured
   Spec-Bench figures (`--measured`: tokens per forward and decode speedup of method `head` in
   docs/results/spec-bench-q4k-s14) at its held-out agreement, and the ratio of measured to
   predicted speedup is applied to the predictions below it ("corrected").

It prints the agreement the issue's goals need (3.0 tokens per forward, 1.6x decode) and, by both
fits, the answers that agreement would take and the hours this 2-core CPU would spend making them
(`--answers-per-hour`, measured in session 12 with the machine to itself) and training on them
(at the rounds' own scored positions per minute, for `--passes` passes over the data).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from adaspec.calibration.profile import Profile
from adaspec.policies.cost import CostTable, best_draft

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "docs/results/draft-head"
# (answers the round trained on, its learning curve): docs/method.md "Draft head", rounds 2-4
ROUNDS = ((753, "curve-answers-753.jsonl"), (1128, "curve-answers-1128.jsonl"), (1913, "curve.jsonl"))
PROFILE = ROOT / "src/adaspec/calibration/profiles/qwen2.5-coder-q4k.json"


def last_held_out(path: Path) -> dict:
    """The final logged entry of a learning curve that has held-out figures."""
    rows = [json.loads(line) for line in path.open()]
    row = [r for r in rows if "held_out" in r][-1]
    return {"top1": row["held_out"][0]["top1"], "top1_2nd": row["held_out"][1]["top1"],
            "minutes": row["minutes"], "positions": row["tokens"]}


def fit_log(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(c, b) of y = c + b ln x, least squares."""
    lx = [math.log(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / sum((u - mx) ** 2 for u in lx)
    return my - b * mx, b


def predict(a: float, table: CostTable, head_ms: float, limit: int) -> tuple[int, float, float]:
    """(k, tokens per target forward, decode speedup over plain decoding) at per-token acceptance a."""
    k, _ = best_draft(a, head_ms, table, limit)
    k = max(k, 1)
    committed = sum(a**i for i in range(k + 1))
    return k, committed, committed * table(1) / (table(k + 1) + k * head_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-cost", type=float, default=0.066,
                    help="the head's cost per drafted token as a fraction of a one-token target forward "
                         "(experiments/head_cost.py, docs/method.md: 0.066)")
    ap.add_argument("--measured", type=float, nargs=2, default=(1.57, 20.1 / 16.9), metavar=("TOKENS", "SPEEDUP"),
                    help="method head's tokens per forward and decode speedup over ar on Spec-Bench "
                         "(spec-bench-q4k-s14: 1.57; 20.1 / 16.9 decode tok/s)")
    ap.add_argument("--answers-per-hour", type=float, default=900.0)
    ap.add_argument("--passes", type=float, default=2.0, help="passes over the data the training estimate assumes")
    ap.add_argument("--limit", type=int, default=16, help="longest draft considered")
    a = ap.parse_args()

    rounds = [(n, last_held_out(CURVES / name)) for n, name in ROUNDS]
    print("held-out agreement of the shipped head's training rounds (16 held-out answers)")
    print(f"{'answers':>8} {'1st token':>9} {'2nd token':>9} {'minutes':>8} {'positions':>10}")
    for n, r in rounds:
        print(f"{n:>8,} {r['top1']:9.3f} {r['top1_2nd']:9.3f} {r['minutes']:8.1f} {r['positions']:>10,}")
    xs, ys = [n for n, _ in rounds], [r["top1"] for _, r in rounds]
    c, b = fit_log(xs, ys)
    b_last = (ys[-1] - ys[-2]) / math.log(xs[-1] / xs[-2])
    print(f"fit: top1 = {c:.3f} + {b:.4f} ln(answers)  (+{b * math.log(2):.3f} per doubling); "
          f"last two rounds: +{b_last * math.log(2):.3f} per doubling")

    profile = Profile.load(PROFILE)
    table = CostTable(profile.cost.target_cost, ahead=a.limit + 1)
    head_ms = a.head_cost * table(1)
    now = ys[-1]
    _, e_now, s_now = predict(now, table, head_ms, a.limit)
    efficiency = a.measured[1] / s_now
    print(f"\ncost model: T(1) {table(1):.1f} ms, T(4) {table(4):.1f}, T(8) {table(8):.1f}, T(16) {table(16):.1f}; "
          f"head {head_ms:.1f} ms per drafted token ({profile.cost.machine})")
    print(f"at today's agreement {now:.3f}: predicted {e_now:.2f} tokens per forward, {s_now:.2f}x decode; "
          f"measured {a.measured[0]:.2f} and {a.measured[1]:.2f}x (measured / predicted speedup {efficiency:.2f})")

    def by_fit(agreement: float) -> float:
        return math.exp((agreement - c) / b)

    def by_last(agreement: float) -> float:
        return xs[-1] * math.exp((agreement - now) / b_last)

    print(f"\n{'agreement':>9} {'k':>3} {'tokens/fwd':>10} {'speedup':>8} {'corrected':>9} "
          f"{'answers (fit)':>14} {'(last two)':>11}")
    for agreement in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85):
        k, e, s = predict(agreement, table, head_ms, a.limit)
        print(f"{agreement:9.2f} {k:>3} {e:10.2f} {s:7.2f}x {s * efficiency:8.2f}x "
              f"{by_fit(agreement):>14,.0f} {by_last(agreement):>11,.3g}")

    def needed(ok) -> float:
        grid = [i / 1000 for i in range(300, 1000)]
        return next((g for g in grid if ok(*predict(g, table, head_ms, a.limit)[1:])), math.nan)

    # Training cost at the rounds' own rate: 800 steps of 4 answers each, so positions per answer-pass
    # = positions / 3,200, and scored positions per minute from the same logs.
    per_answer = sum(r["positions"] for _, r in rounds) / (3200 * len(rounds))
    per_minute = sum(r["positions"] for _, r in rounds) / sum(r["minutes"] for _, r in rounds)
    print(f"\ntraining rate: {per_minute:,.0f} scored positions per minute, {per_answer:.0f} per answer; "
          f"making answers: {a.answers_per_hour:.0f} per hour")
    goals = {"3.0 tokens per forward": needed(lambda e, s: e >= 3.0),
             "1.6x decode (model)": needed(lambda e, s: s >= 1.6),
             "1.6x decode (corrected)": needed(lambda e, s: s * efficiency >= 1.6)}
    for goal, agreement in goals.items():
        n = by_fit(agreement)
        make = max(n - xs[-1], 0) / a.answers_per_hour
        train = n * per_answer * a.passes / per_minute / 60
        print(f"{goal}: agreement {agreement:.3f} per drafted token -> {n:,.0f} answers by the fit "
              f"({by_last(agreement):,.3g} by the last two rounds); on this CPU {make:,.0f} h to make the "
              f"new ones and {train:,.0f} h for {a.passes:g} passes of training")


if __name__ == "__main__":
    main()
