"""bench/gpu.sh at the tiny size on CPU: the suite runs end to end, writes its JSON, prints one table, stays
off grain/datasets, and the decode of both sides emits the same greedy tokens (fp32); then bench.gpu_rows
(decode, GRPO rollout, SFT rows at the tiny size) writes its JSON and the decode's HLO and prints its table last."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_script_runs_the_suite_at_tiny_size_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a real run
    env.update(XR_BENCH_SIZE="tiny", XR_BENCH_REPS="1", OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["imported_grain_or_datasets"] == []
    rows = result["rows"]
    assert {r["section"] for r in rows} == {"sft", "prefill", "decode", "grpo rollout", "grpo update"}
    assert [r["setting"] for r in rows if r["section"] == "decode"] == ["B=1 new=8", "B=8 new=8", "B=64 new=8"]
    for r in rows:
        assert r["xr_jax"] > 0 and r["torch"] > 0 and math.isfinite(r["xr_jax"] + r["torch"]), r
    assert all(r["same_tokens"] == 1.0 for r in rows if r["section"] == "decode")
    assert result["ceilings"]["copy_bytes_per_s"] > 0 and result["ceilings"]["matmul_flops"] > 0
    lines = proc.stdout.strip().splitlines()
    suite = lines.index(next(line for line in reversed(lines) if line.startswith("| section |")))
    assert lines[suite + len(rows) + 1].startswith("| grpo update | tiny |")
    extra = json.loads((tmp_path / "gpu_rows.json").read_text())["rows"]
    assert [r["row"] for r in extra] == ["decode", "grpo rollout", "sft"]
    assert all(r["tokens_per_s"] > 0 for r in extra)
    assert extra[2]["shape"] == "tiny-vl text, remat dots, attention einsum"
    # the checker read the dumped decode: its token loop is the chunk's fixed-count loop (SamplingConfig.chunk)
    assert extra[0]["known_trip_count"] == 8 and extra[0]["collectives"] == {}
    assert "while" in (tmp_path / "decode_7b.hlo.txt").read_text()
    assert lines[-5].startswith("| row |") and lines[-1].startswith("| sft | tiny-vl text")
