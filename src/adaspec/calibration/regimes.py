"""Plot one generation's regime trace: per drafted token its entropy and confidence, the regime
threshold, whether the target accepted it, and per step the drafter used and the draft length k.

The x axis counts drafted tokens in order (a step that drafted nothing takes one slot), so every
draft token the target judged appears once. Tokens after a draft's first rejection were never
judged; they are drawn grey.
"""

from __future__ import annotations

from pathlib import Path

from adaspec.records import TraceStep

_COLORS = {"accepted": "#2a9d45", "rejected": "#d62828", "unjudged": "#9e9e9e"}
_DRAFTERS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d"]


def _points(trace: list[TraceStep]) -> tuple[list[dict], list[dict]]:
    """Per drafted token: x, step, entropy, confidence, status; per step: x0, k, n, drafter."""
    tokens, steps, x = [], [], 0
    for s, t in enumerate(trace):
        n = sum(t.accepted)
        steps.append({"x0": x, "k": t.k, "n": n, "drafter": t.drafter, "step": s})
        for i in range(t.k):
            status = "accepted" if i < n else ("rejected" if i == n else "unjudged")
            tokens.append({"x": x + i, "entropy": t.entropy[i], "confidence": t.confidence[i], "status": status,
                           "c": (t.c_ent[i], t.c_logit[i], t.c_soft[i])})
        x += max(t.k, 1)
    return tokens, steps


def plot_regimes(trace: list[TraceStep], out: str | Path, *, entropy_threshold: float, title: str = "",
               acceptance=None) -> Path:
    """Write the trace figure to `out` (PNG by suffix); acceptance: an AcceptanceModel whose
    predicted probability is drawn beside C, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, steps = _points(trace)
    width = min(40.0, max(8.0, 0.08 * (steps[-1]["x0"] + 1 if steps else 1)))
    fig, (ax_h, ax_c, ax_k) = plt.subplots(3, 1, figsize=(width, 8), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 3, 2]})
    for status, color in _COLORS.items():
        mine = [p for p in tokens if p["status"] == status]
        marker = {"accepted": "o", "rejected": "x", "unjudged": "."}[status]
        for ax, key in ((ax_h, "entropy"), (ax_c, "confidence")):
            ax.scatter([p["x"] for p in mine], [p[key] for p in mine], s=14, c=color, marker=marker,
                       label=f"{status} ({len(mine)})" if ax is ax_h else None, zorder=3)
    ax_h.axhline(entropy_threshold, color="black", ls="--", lw=1, label=f"regime threshold {entropy_threshold:.3f}")
    ax_h.axhspan(entropy_threshold, 1.0, color="#fde2e2", zorder=0, label="reasoning regime (above)")
    top = max([p["entropy"] for p in tokens] + [entropy_threshold]) * 1.1 + 1e-3
    ax_h.set_ylim(0, min(1.0, top))
    ax_h.set_ylabel("normalised entropy H/log V")
    ax_h.legend(loc="upper right", fontsize=8, ncol=2)
    if acceptance is not None and tokens:
        ax_c.plot([p["x"] for p in tokens], [acceptance.prob(*p["c"]) for p in tokens], color="#6a4c93", lw=0.8,
                  label="calibrated acceptance probability")
        ax_c.legend(loc="lower right", fontsize=8)
    ax_c.set_ylim(-0.02, 1.02)
    ax_c.set_ylabel("confidence C")

    names = sorted({s["drafter"] for s in steps})
    colors = {d: _DRAFTERS[i % len(_DRAFTERS)] for i, d in enumerate(names)}
    for d in names:
        mine = [s for s in steps if s["drafter"] == d]
        ax_k.bar([s["x0"] for s in mine], [max(s["k"], 0.2) for s in mine], width=[max(s["k"], 1) for s in mine],
                 align="edge", color=colors[d], alpha=0.35, edgecolor=colors[d], label=f"drafter {d}: k")
        ax_k.bar([s["x0"] for s in mine], [s["n"] for s in mine], width=[max(s["n"], 0.0) for s in mine],
                 align="edge", color=colors[d], alpha=0.9)
    ax_k.set_ylabel("k (light) / accepted n")
    ax_k.set_xlabel("drafted token (in order; a step with k = 0 takes one slot)")
    if names:
        ax_k.legend(loc="upper right", fontsize=8)
    accepted = sum(s["n"] for s in steps)
    drafted = sum(s["k"] for s in steps)
    fig.suptitle(title or f"{len(steps)} steps, {drafted} drafted, {accepted} accepted", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
