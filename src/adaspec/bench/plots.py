"""Benchmark plots (matplotlib, Agg backend, PNG): speedup, calibration, accepted lengths, one trace.

Calibration reads the per-token traces in records.jsonl. Within a step, acceptance stops at the
first rejection, so a draft token after it was never judged: each step contributes its accepted
tokens and its first rejected one, and the curve is P(accepted | every earlier token accepted,
confidence in the bucket). Only lossless (exact-verification) methods count, and not the oracle,
whose drafts are cut at the first disagreement by construction.
"""

from __future__ import annotations

from pathlib import Path

from adaspec.bench.report import Run, machine_line

SIGNALS = (("c_ent", "c_ent (entropy)"), ("c_logit", "c_logit (logit margin)"),
           ("c_soft", "c_soft (softmax margin)"), ("confidence", "C (ensemble)"))
ADAPTIVE = ("cmasd", "cmasd-k", "entropy", "confidence-stop", "heuristic", "multi-draft")


BASELINES = ("ar", "hf-ar", "hf-assisted", "llamacpp-ar", "llamacpp-spec")  # other engines and plain decoding
# 20 distinguishable colours for adaspec's methods (matplotlib's tab20, dark shades first); the
# baselines get greys with a hatch, so they never share a colour with a method.
_METHOD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                   "#17becf", "#393b79", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                   "#f7b6d2", "#dbdb8d", "#9edae5", "#637939"]
_BASELINE_GREYS = ["#4d4d4d", "#7f7f7f", "#a6a6a6", "#595959", "#8c8c8c"]


def method_styles(methods: list[str]) -> dict[str, dict]:
    """One bar style per method, the same in every plot of a run: a colour of its own for each
    adaspec method (in run order), grey and hatched for the baselines."""
    styles, i = {}, 0
    for m in methods:
        base = m.split(":")[0]
        if base in BASELINES:
            styles[m] = {"color": _BASELINE_GREYS[BASELINES.index(base) % len(_BASELINE_GREYS)], "hatch": "//",
                         "edgecolor": "white"}
        else:
            styles[m] = {"color": _METHOD_COLOURS[i % len(_METHOD_COLOURS)]}
            i += 1
    return styles


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(run_dir: str | Path, run: Run | None = None) -> list[Path]:
    """Every plot the run's data allows; returns the PNG paths written."""
    run = run or Run(run_dir)
    out = []
    for name, fn in (("speedup.png", plot_speedup), ("calibration.png", plot_calibration),
                     ("accepted_length.png", plot_accepted_lengths), ("trace.png", plot_trace)):
        path = run.dir / name
        if fn(run, path):
            out.append(path)
    return out


def plot_speedup(run: Run, path: Path) -> bool:
    """Spec-Bench speedup over ar per subtask (and overall), one bar per method."""
    methods = [m for m in run.methods if m != "ar"]
    groups = ["all", *run.subtasks]
    if not methods:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.25 * len(groups) * len(methods) + 2)), 4))
    width = 0.8 / len(methods)
    styles = method_styles(run.methods)
    for j, m in enumerate(methods):
        vals = [(s.speedup_specbench if (s := run.summary(m, None if g == "all" else g)) else 0.0) for g in groups]
        ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))], vals, width, label=m,
               **styles[m])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel("speedup over ar (Spec-Bench)")
    ax.set_title(_title(run, "speedup per subtask"), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the bars
    return _save(fig, path)


def calibration_points(run: Run) -> dict[str, list[tuple[float, bool]]]:
    """signal -> (value, accepted) for every judged draft token of the lossless traced methods."""
    points = {key: [] for key, _ in SIGNALS}
    for m in run.methods:
        if run.base_method(m) == "oracle":
            continue
        for row in run.prompts[m].values():
            t = row.get("trace")
            if not t or not row.get("lossless"):
                continue
            judged = _judged(t)
            for key, _ in SIGNALS:
                points[key] += [(t[key][i], bool(t["accepted"][i])) for i in judged]
    return points


def _judged(t: dict) -> list[int]:
    """Indices of drafted tokens that were judged: each step's accepted prefix and first rejection."""
    out, i = [], 0
    for k, n in zip(t["k"], t["n_accepted"]):
        out += list(range(i, i + min(n + 1, k)))
        i += k
    return out


def plot_calibration(run: Run, path: Path, bins: int = 10) -> bool:
    points = calibration_points(run)
    if not any(points.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="perfectly calibrated")
    for key, label in SIGNALS:
        xs, ys, ece, n = [], [], 0.0, len(points[key])
        for b in range(bins):
            inside = [(c, a) for c, a in points[key] if b / bins <= c < (b + 1) / bins or (b == bins - 1 and c == 1)]
            if inside:
                conf = sum(c for c, _ in inside) / len(inside)
                acc = sum(a for _, a in inside) / len(inside)
                xs.append(conf)
                ys.append(acc)
                ece += len(inside) / n * abs(acc - conf)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{label}, ECE {ece:.2f}")
    ax.set_xlabel("confidence (bucket mean)")
    ax.set_ylabel("empirical acceptance rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(_title(run, f"calibration, {len(points['confidence'])} judged draft tokens"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accepted_lengths(run: Run, path: Path) -> bool:
    """Per method, the share of steps that accepted n = 0, 1, 2, ... draft tokens."""
    counts = {}
    for m in run.methods:
        ns = [n for row in run.prompts[m].values() if row.get("trace") for n in row["trace"]["n_accepted"]]
        if ns:
            counts[m] = ns
    if not counts:
        return False
    plt = _plt()
    top = max(max(ns) for ns in counts.values())
    cols = min(3, len(counts))
    rows = -(-len(counts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows + 0.8), sharex=True, sharey=True,
                             squeeze=False)
    styles = method_styles(run.methods)
    for ax, (m, ns) in zip(axes.flat, counts.items()):
        ax.bar(range(top + 1), [ns.count(n) / len(ns) for n in range(top + 1)], **styles[m])
        ax.set_title(f"{m} (mean {sum(ns) / len(ns):.2f})", fontsize=8)
        ax.set_xticks(range(top + 1))
    for ax in axes.flat[len(counts):]:
        ax.set_visible(False)
    fig.supxlabel("accepted draft tokens in a step", fontsize=9)
    fig.supylabel("share of steps", fontsize=9)
    fig.suptitle(_title(run, "accepted length per step"), fontsize=9)
    return _save(fig, path)


def plot_trace(run: Run, path: Path, method: str | None = None, record_id: str | None = None) -> bool:
    """One answer, drafted token by drafted token: entropy, C, the step's k, accepted or rejected."""
    traced = [m for m in run.methods if any(r.get("trace") for r in run.prompts[m].values())]
    if method is None:
        preferred = (m for base in ADAPTIVE for m in traced if run.base_method(m) == base)
        method = next(preferred, traced[0] if traced else None)
    if method is None:
        return False
    rows = {rid: r for rid, r in run.prompts[method].items() if r.get("trace") and r["trace"]["step"]}
    if not rows:
        return False
    # by default the answer with the most accepted drafts: the one with something to show
    row = rows.get(record_id) or max(rows.values(),
                                     key=lambda r: (sum(r["trace"]["accepted"]), len(r["trace"]["step"])))
    t = row["trace"]
    plt = _plt()
    x = range(len(t["step"]))
    fig, ax = plt.subplots(figsize=(max(7, 0.12 * len(t["step"])), 4))
    ax.plot(x, t["entropy"], lw=1, label="normalised entropy H / log V")
    ax.plot(x, t["confidence"], lw=1, label="confidence C")
    ok = [i for i in x if t["accepted"][i]]
    judged = set(_judged(t))
    bad = [i for i in x if not t["accepted"][i] and i in judged]
    ax.scatter(ok, [1.04] * len(ok), marker="|", color="green", label="accepted")
    ax.scatter(bad, [1.04] * len(bad), marker="x", color="red", label="rejected")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("drafted token")
    ax.set_ylabel("signal")
    ax2 = ax.twinx()
    ax2.step(x, [t["k"][s] for s in t["step"]], where="mid", color="gray", lw=0.8, label="draft length k")
    ax2.set_ylabel("k")
    ax.set_title(_title(run, f"trace of {method} on {row['record_id']}"), fontsize=9)
    lines, labels = ax.get_legend_handles_labels()
    l2, lb2 = ax2.get_legend_handles_labels()
    ax.legend(lines + l2, labels + lb2, fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_pareto(points: list[dict], path: Path, *, quality: str, title: str) -> bool:
    """Sweep points (dicts with label, speedup and the quality key) and their Pareto frontier."""
    pts = [p for p in points if p.get(quality) is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    front = pareto_front(pts, quality)
    ax.scatter([p["speedup"] for p in pts], [p[quality] for p in pts], s=14, color="tab:blue", label="grid point")
    ax.plot([p["speedup"] for p in front], [p[quality] for p in front], color="tab:red", marker="o", ms=4,
            label="Pareto frontier")
    for p in front:
        ax.annotate(p["label"].split(":", 1)[-1], (p["speedup"], p[quality]), fontsize=6)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup over ar (Spec-Bench)")
    ax.set_ylabel(quality)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def pareto_front(points: list[dict], quality: str) -> list[dict]:
    """Points no other point beats on both speedup and quality, by increasing speedup."""
    best, front = float("-inf"), []
    for p in sorted(points, key=lambda p: (-p["speedup"], -p[quality])):
        if p[quality] > best:
            front.append(p)
            best = p[quality]
    return front[::-1]


def _title(run: Run, what: str) -> str:
    return f"{what}\n{run.meta.get('command', '')[:110]}\n{machine_line(run.meta)}"


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend beside the axes is kept
    _plt().close(fig)
    return True
