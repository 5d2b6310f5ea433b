"""The SLURM and TPU-pod launchers, run against stand-ins for `srun` and `gcloud` (this machine has
neither): the per-task GPU selection and the command each worker would run. The local launcher is
exercised for real by test_multiprocess.py."""

import os
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# srun stand-in: drop srun's own options, run the task command once (as one task would).
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
# gcloud stand-in: print the arguments, one per line.
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$@"
"""
PRINT_IDS = ["python3", "-c", "import os; print('ids=' + os.environ.get('JAX_LOCAL_DEVICE_IDS', 'unset'))"]


@pytest.fixture()
def fake_bin(tmp_path):
    for name, text in (("srun", FAKE_SRUN), ("gcloud", FAKE_GCLOUD)):
        path = tmp_path / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def _slurm(fake_bin, **env) -> str:
    base = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    out = subprocess.run(["bash", "launch/slurm_gpu.sh", *PRINT_IDS], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_slurm_one_process_per_node_drives_every_gpu(fake_bin):
    got = _slurm(fake_bin, SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8")
    assert got == "ids=0,1,2,3,4,5,6,7"


def test_slurm_one_process_per_gpu(fake_bin):
    # every GPU visible: JAX's own SLURM default ([SLURM_LOCALID]) is left alone
    assert _slurm(fake_bin, SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2") == "ids=unset"
    # SLURM bound one GPU to the task: it is device 0 of this process
    assert _slurm(fake_bin, SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2", CUDA_VISIBLE_DEVICES="5") == "ids=0"


def test_slurm_without_a_command_fails_with_usage(fake_bin):
    out = subprocess.run(["bash", "launch/slurm_gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_tpu_pod_runs_the_quoted_command_on_all_workers(fake_bin):
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "PROJECT": "proj", "SETUP": "git pull"}
    out = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "pod-1", "us-east5-a", "--", "xr-jax", "sft", "--config", "a b.yaml",
         "optim.lr=1e-5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert "--worker=all" in args and args[args.index("--project") + 1] == "proj"
    remote = args[args.index("--command") + 1]
    assert remote.startswith("set -e; cd ~/xr_jax; git pull; exec xr-jax sft --config a\\ b.yaml optim.lr=1e-5")
    assert remote.endswith("distributed.initialize=always")


# scontrol stand-in: record the call.
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.mark.parametrize("code,requeued", [(75, True), (0, False), (1, False), (2, False)])
def test_slurm_requeues_a_run_stopped_with_its_checkpoint_saved(fake_bin, tmp_path, code, requeued):
    scontrol = os.path.join(fake_bin, "scontrol")
    with open(scontrol, "w") as f:
        f.write(FAKE_SCONTROL)
    os.chmod(scontrol, 0o755)
    log = tmp_path / "scontrol.log"
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SCONTROL_LOG": str(log)}
    out = subprocess.run(["bash", "launch/slurm_gpu.sh", "bash", "-c", f"exit {code}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == code, out.stderr
    assert (log.read_text() if log.exists() else "") == ("requeue 77\n" if requeued else "")
    env["XR_JAX_REQUEUE"] = "0"
    log.unlink(missing_ok=True)
    assert subprocess.run(["bash", "launch/slurm_gpu.sh", "bash", "-c", f"exit {code}"], cwd=ROOT, env=env,
                          capture_output=True, timeout=30).returncode == code and not log.exists()


def test_slurm_script_outlives_a_sigterm_and_requeues(fake_bin, tmp_path):
    """SLURM sends TERM to the batch script too: it waits for the run to save and exit 75, then requeues."""
    scontrol = os.path.join(fake_bin, "scontrol")
    with open(scontrol, "w") as f:
        f.write(FAKE_SCONTROL)
    os.chmod(scontrol, 0o755)
    log, ready = tmp_path / "scontrol.log", tmp_path / "ready"
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "78", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SCONTROL_LOG": str(log)}
    # the "run": ignores TERM (as xr-jax finishes its step), takes a moment to save, exits 75
    task = f"trap '' TERM; touch {ready}; sleep 1; exit 75"
    proc = subprocess.Popen(["bash", "launch/slurm_gpu.sh", "bash", "-c", task], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "waiting for xr-jax to save" in err and log.read_text() == "requeue 78\n"
