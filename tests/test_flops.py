"""Peak FLOP/s on every accelerator the recipe may run on, from the `device_kind` strings the runtimes
report (TPU ones as libtpu's topologies name them: v5e is "TPU v5 lite", v5p is "TPU v5"); an unknown
device warns once and the run goes on with MFU unknown: absent from the metrics, "n/a" in the log line."""

import json
import types
import warnings

import jax.numpy as jnp
import pytest

from xr_jax.train import flops, loop, state as state_lib

KINDS = {
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA B200": 2.25e15, "NVIDIA GB200": 2.5e15,
    "NVIDIA L4": 121e12, "NVIDIA L40S": None,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v3": 123e12,
}


@pytest.mark.parametrize("kind,peak", KINDS.items())
def test_datasheet_peak_by_device_kind(kind, peak):
    assert flops.datasheet_peak(kind) == peak


def test_unknown_device_warns_once_and_gives_none():
    device = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA Future X1")
    with pytest.warns(UserWarning, match="NVIDIA Future X1.*MFU is reported as unknown"):
        assert flops.peak_flops(device) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flops.peak_flops(device) is None  # no second warning
    assert flops.peak_flops(types.SimpleNamespace(platform="tpu", device_kind="TPU v5")) == 459e12


class _Batches:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {}

    def get_state(self):
        return {"index": self.i}


@pytest.mark.parametrize("peak", [None, 100.0])
def test_loop_reports_mfu_only_with_a_known_peak(tmp_path, capsys, monkeypatch, peak):
    """run_loop as sft.main calls it on an unknown device (peak None): the run finishes, the metrics have
    no "mfu" and the batch-job line says "mfu n/a"; with a peak both carry the figure."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state=(),
                                 rng=None)
    step_fn = lambda s, b: (s.replace(step=s.step + 1), {"loss": 1.0, "skipped": 0})  # noqa: E731
    logger = loop.MetricsLogger(str(tmp_path))
    result = loop.run_loop(state, step_fn, _Batches(), total_steps=2, put_batch=lambda b: b, logger=logger,
                           flops_fn=lambda b: 1.0, peak_flops=peak, progress=False, print_every=1)
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert result.steps == 2 and len(records) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    if peak is None:
        assert all("mfu" not in r for r in records) and all("mfu n/a" in line for line in lines)
    else:
        assert all(r["mfu"] > 0 for r in records) and all("mfu " in line and "%" in line for line in lines)
