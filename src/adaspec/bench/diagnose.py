"""`adaspec diagnose`: the failure signatures of a benchmark run, each with the knob to turn."""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.bench.report import Run, _f, header
from adaspec.config import METHODS


@dataclass
class Finding:
    kind: str  # "bug" | "rollback" | "no-speedup" | "quality-loss"
    method: str
    seen: str  # what the run shows
    action: str  # the knob to turn


def diagnose(run: Run, *, rollback_limit: float = 0.4, waste_limit: float = 0.05, agreement_floor: float = 0.95,
             metric_drop: float = 1.0) -> list[Finding]:
    """Name the failure signatures in a run, each with the knob to turn.

    - an adaspec lossless method's output differs from ar (greedy) -> a bug (hf-* and llamacpp-* run
      other engines, whose tokens are not expected to equal ar's);
    - rollback rate over `rollback_limit`, and the drafting of rejected tokens took over `waste_limit`
      of the generation time (drafting's share of the time x the share of drafted tokens rejected)
      -> reduce k_max or use a better-aligned drafter. A cheap drafter (the draft head, prompt
      lookup) is meant to be rejected often: a cost-aware length drafts while a token is worth its
      price, so its rollbacks cost little and are no failure;
    - no speedup over ar -> check confidence calibration and the drafter's cost;
    - a lossy method agrees with ar on less than `agreement_floor` of tokens, or loses more than
      `metric_drop` points of a task metric -> lower tau_base or raise gamma.
    """
    out = []
    cost = run.meta.get("cost_model") or {}
    c = None
    if cost.get("drafter_ms_per_token") and cost.get("target_ms"):
        c = cost["drafter_ms_per_token"] / cost["target_ms"]["1"]
    ar_task = run.task_quality("ar")
    for m in run.methods:
        s = run.summary(m)
        if m == "ar" or s is None:
            continue
        adaspec = run.runtime(m) == "adaspec"  # other engines' tokens are not expected to equal ar's
        ours = adaspec and run.base_method(m) != "oracle"
        if adaspec and s.lossless and s.greedy and s.identical < s.n:
            out.append(Finding("bug", m, f"lossless, yet its output differs from ar on {s.n - s.identical} of "
                                         f"{s.n} prompts", "report it with records.jsonl; rerun with --dtype float64 "
                                                           "to rule out float32 near-ties"))
        waste = _wasted_drafting(s)
        if ours and s.rollback is not None and s.rollback > rollback_limit and (waste is None or waste > waste_limit):
            fixed = METHODS.get(run.base_method(m), (None,))[0] == "fixed"  # its length knob is k, not k_max
            knob = (f"k (--k, now {run.option(m, 'k', 4)})" if fixed
                    else f"k_max (--k-max, now {run.option(m, 'k_max', 8)})")
            spent = "" if waste is None else f"; drafting rejected tokens took {waste:.0%} of the time"
            out.append(Finding("rollback", m, f"rollback rate {s.rollback:.0%} (over {rollback_limit:.0%}) with "
                                              f"acceptance {_f(s.acceptance, '{:.0%}')}{spent}",
                               f"reduce {knob} or use a better-aligned drafter"))
        if ours and s.speedup_specbench <= 1.0:
            cost_note = (f"one drafted token costs c = {c:.2f} target forwards, and a target forward yields "
                         f"{_f(s.mean_accepted)} tokens" if c is not None else "not measured: drop --no-cost-model")
            out.append(Finding("no-speedup", m, f"no speedup over ar ({s.speedup_specbench:.2f}x Spec-Bench, "
                                                f"{s.speedup_paired:.2f}x paired)",
                               "check confidence calibration (calibration.png: is acceptance rising with C?) and "
                               f"the cost of the drafter ({cost_note})"))
        if ours and not s.lossless:
            task = run.task_quality(m)
            drops = [f"{k} {ar_task[k]:.1f} -> {v:.1f}" for k, v in task.items()
                     if k in ar_task and ar_task[k] - v > metric_drop]
            if s.agreement < agreement_floor or drops:
                seen = f"token agreement with ar {s.agreement:.1%}" + (f"; {', '.join(drops)}" if drops else "")
                out.append(Finding("quality-loss", m, seen,
                                   f"lower tau_base (--tau-base, now {run.option(m, 'tau_base', 0.0)}) or raise "
                                   f"gamma (--gamma, now {run.option(m, 'gamma', 1.0)})"))
    return out


def _wasted_drafting(s) -> float | None:
    """Share of generation time spent drafting tokens that were rejected (None where not measured)."""
    if not s.shares or s.acceptance is None:
        return None
    return s.shares.get("draft", 0.0) * (1.0 - s.acceptance)


def render_diagnosis(run: Run, findings: list[Finding]) -> str:
    lines = [f"diagnosis of {run.dir} ({header(run.meta).strip('_')})"]
    if not findings:
        lines.append("no failure signature found.")
    lines += [f"[{f.kind}] {f.method}: {f.seen}.\n    -> {f.action}." for f in findings]
    return "\n".join(lines)
