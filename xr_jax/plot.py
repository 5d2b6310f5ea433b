"""Training curves (`xr-jax plot`): one subplot per metric, one line per run, from each run's metrics.jsonl.

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


def plot_runs(run_dirs: Sequence[str], metrics: Optional[Sequence[str]] = None, out: str = "curves.png") -> list[str]:
    """Draw the curves of `metrics` (default: every metric any run logged, in first-seen order) and save a PNG.

    Returns the metrics drawn. A named metric that no run logged is an error (the message lists the known ones).
    """
    from matplotlib.figure import Figure  # the object API renders with Agg: no display, no global pyplot state

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
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for label, curves in zip(run_labels(run_dirs), runs):
            if metric in curves:
                ax.plot(*curves[metric], label=label, linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(run_dirs) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    return list(metrics)
