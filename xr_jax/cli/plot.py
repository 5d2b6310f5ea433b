"""Training curves: one subplot per metric, one line per run (`xr-jax plot`), or one subplot per run and metric
(`plot_panels`, the demo's figure), from each run's metrics.jsonl.

`metrics.jsonl` is what `xr_jax.train.loop.MetricsLogger` writes: one JSON object per line with "step" and
float metrics. A resumed run appends to the file and logs again the steps after its checkpoint, so for a
repeated step the last line wins (the curve of the run as it finally went).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from xr_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"


class MetricsError(UserError, ValueError):
    """A run directory without a readable metrics.jsonl, or metrics that none of the runs logged."""


Curves = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values), steps increasing


def read_metrics(run_dir: str) -> Curves:
    """Every numeric metric of `run_dir/metrics.jsonl` as (steps, values); the last line of a step wins."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise MetricsError(f"{run_dir!r} has no {METRICS_FILE} (is it a run's logging.dir?)")
    by_step: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise MetricsError(f"{path}:{line_no}: not a metrics record with a 'step' ({e})") from None
            by_step[step] = {k: float(v) for k, v in record.items()
                             if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    curves: Curves = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            steps, values = curves.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return curves


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Legend names: the folder names, or the paths as given when two folders share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def _figure(n: int, cols: int = 3):
    """A figure with `n` subplots in rows of `cols` (the object API renders with Agg: no display, no pyplot state)."""
    from matplotlib.figure import Figure

    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)


def plot_runs(run_dirs: Sequence[str], metrics: Optional[Sequence[str]] = None, out: str = "curves.png") -> list[str]:
    """Draw the curves of `metrics` (default: every metric any run logged, in first-seen order) and save a PNG.

    Returns the metrics drawn. A named metric that no run logged is an error (the message lists the known ones).
    """
    if not run_dirs:
        raise MetricsError("give at least one run directory")
    runs = [read_metrics(d) for d in run_dirs]
    known = list(dict.fromkeys(k for curves in runs for k in curves))
    if metrics is None:
        metrics = known
    missing = [m for m in metrics if m not in known]
    if missing:
        raise MetricsError(f"no run logged {', '.join(missing)}; the runs have: {', '.join(known) or 'no metrics'}")
    if not metrics:
        raise MetricsError(f"the runs' {METRICS_FILE} files hold no numeric metrics")
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for label, curves in zip(run_labels(run_dirs), runs):
            if metric in curves:
                ax.plot(*curves[metric], label=label, linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(run_dirs) > 1:
            ax.legend(fontsize="small")
    _save(fig, out)
    return list(metrics)


def plot_panels(panels: Sequence[tuple[str, str, str]], out: str = "curves.png") -> list[str]:
    """One subplot per `(run_dir, metric, title)`: every stage's metric on its own axis (metrics of different
    stages, such as an SFT loss and a GRPO surrogate loss, do not share a scale). Returns the titles drawn."""
    runs = {d: read_metrics(d) for d in dict.fromkeys(d for d, _, _ in panels)}
    missing = [f"{d}: {m}" for d, m, _ in panels if m not in runs[d]]
    if missing:
        raise MetricsError(f"not logged: {', '.join(missing)}")
    fig, axes = _figure(len(panels))
    for ax, (run_dir, metric, title) in zip(axes, panels):
        steps, values = runs[run_dir][metric]
        ax.plot(steps, values, linewidth=1.2, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(f"{run_labels([run_dir])[0]} step")
        ax.grid(alpha=0.3)
    _save(fig, out)
    return [title for _, _, title in panels]
