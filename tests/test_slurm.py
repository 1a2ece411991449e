"""bdlora on a real one-node Slurm cluster: the batch script (TP 2, requeue after a preemption
signal) and a Hydra multirun as a job array through submitit, every job a 2-process TP run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import bdlora
from tests.conftest import tiny_model
from tests.slurm_cluster import sbatch_wait, start_or_skip
from tests.test_train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
SMALL = [
    "experiment=demo",
    "parallel.tp=2",
    "eval_every=0",
    "logger.progress=false",
    "data.num_examples=200",
    "data.seq_len=32",
]
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5]])


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # socket paths must stay short
    try:
        with start_or_skip(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_env(slurm) -> dict[str, str]:
    """What a user's shell has at submission: bdlora's environment on PATH, the cluster's config."""
    return {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def squeue(env: dict[str, str], job: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)  # polling interval, not a timing assumption


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_batch_script_runs_tp2_in_a_fresh_directory_and_peft_loads_the_adapter(job_env, tmp_path):
    # a fresh directory: no outputs/ yet, as in a new clone
    result = sbatch_wait(
        SBATCH, "--nodes=1", "--cpus-per-task=2", script_args=[*SMALL, "steps=3"], cwd=tmp_path, env=job_env
    )
    logs = list(tmp_path.glob("bdlora-*.out"))
    assert len(logs) == 1, sorted(p.name for p in tmp_path.iterdir())
    log = logs[0].read_text()
    assert result.returncode == 0, result.stderr + log
    job = re.fullmatch(r"bdlora-(\d+)\.out", logs[0].name)[1]
    run_dir = tmp_path / "outputs" / "slurm" / job
    assert "mesh            dp=1 x tp=2 (2 ranks, cpu)" in log, log
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]

    peft_model = PeftModel.from_pretrained(tiny_model(), run_dir / "adapter").eval()
    ours = bdlora.load_adapter(tiny_model(), run_dir / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(ours), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(peft_model), logits(tiny_model()), atol=1e-4)  # it trained


@pytest.mark.slow
def test_a_preemption_signal_checkpoints_requeues_and_the_job_resumes(job_env, tmp_path):
    args = [*SMALL, "steps=30", "checkpoint.every=1000", "data.seq_len=64"]  # only the signal checkpoints
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", str(SBATCH), *args],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip()
    run_dir = tmp_path / "outputs" / "slurm" / job
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, "step 2")
    # what Slurm sends before a time limit (--signal=B:USR1@120) or a preemption
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=job_env, check=True)

    def finished() -> bool:
        state = squeue(job_env, job)
        if "BeginTime" in state:  # a requeued job waits before it is eligible again: release it sooner,
            # but not within the second of the requeue: slurmd refuses a job id whose credential it
            # revoked in that same second ("Job credential revoked"), which Slurm's wait exists to avoid
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=job_env, check=False
            )
        return state == "" and (run_dir / "summary.json").exists()

    log_file = tmp_path / f"bdlora-{job}.out"
    try:
        wait_until(finished, 240, f"job {job} to be requeued and finish")
    except AssertionError as err:
        state = squeue(job_env, job)
        raise AssertionError(f"{err}; squeue: {state!r}; job log:\n{log_file.read_text()}") from None
    log = log_file.read_text()
    assert "requeueing job" in log and f"job {job} (restart 1)" in log, log
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert resumed, log
    stopped_at = int(resumed[2])
    assert 2 <= stopped_at < 30, log
    assert f"stopped by SIGTERM after step {stopped_at}" in log, log
    # one record per step: the steps after the checkpoint ran once, in the requeued job
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 31))


@pytest.mark.slow
def test_a_hydra_multirun_becomes_a_job_array_of_tp2_runs(job_env, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdlora.train",
            "-m",
            "hydra/launcher=bdlora_slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
            *SMALL,
            "steps=2",
            "adapter.groups.attn.rank=4,8",
        ],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    params = []
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        plan = json.loads((sweep / job / "plan.json").read_text())
        params.append(plan["params"])
        assert summary["adapter_params"] == plan["params"]
        assert (sweep / job / "adapter" / "adapter_config.json").is_file()
        attn_ranks = {m["rank"] for name, m in plan["modules"].items() if "self_attn" in name}
        assert attn_ranks == {4 * (int(job) + 1)}
    logs = sorted((sweep / ".submitit").rglob("*_0_log.out"))
    assert len(logs) == 2 and all("mesh            dp=1 x tp=2" in p.read_text() for p in logs), logs
    assert params[0] < params[1]
