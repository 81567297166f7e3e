"""`adaspec sweep`'s report: speed against quality over a knob grid, with the Pareto frontier."""

from __future__ import annotations

import statistics
from pathlib import Path

from adaspec.bench.plots import pareto_front, plot_pareto
from adaspec.bench.report import Run, _f, header, machine_line, provenance


def sweep_points(run: Run, labels: list[str]) -> list[dict]:
    """Per grid point: its speedups, token agreement with ar, and mean task metric where there is one."""
    points = []
    for label in labels:
        s = run.summary(label)
        if s is None:
            continue
        task = run.task_quality(label)
        points.append({"label": label, "speedup": s.speedup_specbench, "speedup_paired": s.speedup_paired,
                       "agreement": 100 * s.agreement, "task": statistics.fmean(task.values()) if task else None,
                       "mean_accepted": s.mean_accepted, "lossless": s.lossless})
    return points


def write_sweep(run_dir: str | Path, labels: list[str], grid: dict) -> Path:
    """sweep.md and the Pareto plots (speedup vs agreement with ar, and vs task metric)."""
    run = Run(run_dir)
    points = sweep_points(run, labels)
    ar_task = run.task_quality("ar")
    title = f"sweep of {', '.join(grid)}\n{run.meta.get('command', '')[:110]}\n{machine_line(run.meta)}"
    plots = []
    if plot_pareto(points, run.dir / "sweep_agreement.png", quality="agreement", title=title):
        plots.append("sweep_agreement.png")
    if plot_pareto(points, run.dir / "sweep_task.png", quality="task", title=title):
        plots.append("sweep_task.png")
    front = {p["label"] for p in pareto_front(points, "agreement")}
    lines = ["# adaspec sweep", "", provenance(run.meta), "",
             "grid: " + ", ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in grid.items()), "",
             header(run.meta), "",
             "| Point | speedup (Spec-Bench) | speedup (paired) | accepted / fwd | agreement with ar | task metric | "
             "lossless | Pareto (agreement) |", "|---" * 8 + "|"]
    for p in sorted(points, key=lambda p: -p["speedup"]):
        lines.append(f"| {p['label']} | {p['speedup']:.2f}x | {p['speedup_paired']:.2f}x | {_f(p['mean_accepted'])} | "
                     f"{p['agreement']:.1f}% | {_f(p['task'], '{:.1f}')} | {'yes' if p['lossless'] else 'no'} | "
                     f"{'yes' if p['label'] in front else ''} |")
    lines += ["", f"task metric: the mean of {', '.join(ar_task) or 'no task metric (none for these subtasks)'} "
                  f"(ar: {_f(statistics.fmean(ar_task.values()) if ar_task else None, '{:.1f}')}). "
                  "A point is on the frontier when no other point is both faster and closer to ar."]
    lines += [f"\n![{p}]({p})" for p in plots]
    path = run.dir / "sweep.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
