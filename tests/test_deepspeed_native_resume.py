"""A DeepSpeed checkpoint resumed by the native engine (real DeepSpeed, ``DS_ACCELERATOR=cpu``, gloo).

DeepSpeed runs write bdlora's adapter and ``optim`` shards beside ``deepspeed/``, the AdamW moments
gathered from ZeRO's partitions, so ``parallel.engine=native`` continues them at the same TP degree
and at another on the uninterrupted trajectory. A DeepSpeed checkpoint without the ``optim`` shards
(saved before they were written) resumes its adapter, step and data with fresh moments, and says so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bdlora.train.checkpoint import step_dir_name, write_manifest
from tests.test_deepspeed import ARGS, final_adapter, trained
from tests.test_train import by_step, output_of, read_metrics, train

SAVED = 2  # ARGS: 4 steps, a checkpoint every 2
RESET = "AdamW's moments and step count start again from zero"


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> Path:
    """ZeRO 2 at DP 2 x TP 1: each rank holds half of the moments, cut through the parameters."""
    tmp = tmp_path_factory.mktemp("zero2")
    return trained(tmp, "run", 2, "parallel.engine=deepspeed", "deepspeed=zero2", "parallel.tp=1")


def resume_natively(source: Path, run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    """The native engine resumed from ``source``'s step-2 checkpoint, copied into ``run_dir``."""
    saved = step_dir_name(SAVED)
    shutil.copytree(source / "checkpoints" / saved, run_dir / "checkpoints" / saved)
    args = [*ARGS, *overrides, "checkpoint.resume=auto", f"run_dir={run_dir}"]
    result = train(nproc, *args, cwd=run_dir.parent)
    assert result.returncode == 0, output_of(result)
    assert f"at step {SAVED}" in result.stdout
    return result


# (processes, TP degree, micro-batch): 8 rows per step, as the DeepSpeed run's 4 on each of 2 DP ranks
LAYOUTS = {"same-tp": (2, 1, 4), "tp2": (2, 2, 8)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_native_engine_continues_a_deepspeed_run(zero2, tmp_path, layout):
    nproc, tp, micro = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    result = resume_natively(zero2, run_dir, nproc, f"parallel.tp={tp}", f"data.micro_batch_size={micro}")
    assert RESET not in result.stdout
    expected, got = by_step(read_metrics(zero2)), by_step(read_metrics(run_dir))
    assert got.keys() == {3, 4}
    # step 4 moves with the moments restored at step 2: fresh ones move it by ~6e-5
    for step, loss in got.items():
        assert abs(loss - expected[step]) < 1e-5, (layout, step, loss, expected[step])
    assert by_step(read_metrics(run_dir), "lr") == {
        s: lr for s, lr in by_step(read_metrics(zero2), "lr").items() if s > SAVED
    }
    if tp == 1:  # across TP degrees rounding moves near-zero elements (see test_deepspeed.assert_same_run)
        reference = final_adapter(zero2)
        for key, value in final_adapter(run_dir).items():
            torch.testing.assert_close(value, reference[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_a_deepspeed_checkpoint_without_optim_shards_resumes_with_fresh_moments(zero2, tmp_path):
    older = tmp_path / "older"  # as a DeepSpeed run saved it before bdlora wrote its moments too
    checkpoint = older / "checkpoints" / step_dir_name(SAVED)
    shutil.copytree(zero2 / "checkpoints" / step_dir_name(SAVED), checkpoint)
    for shard in checkpoint.glob("optim-tp*.safetensors"):
        shard.unlink()
    write_manifest(checkpoint)
    run_dir = tmp_path / "run"
    result = resume_natively(older, run_dir, 2, "parallel.tp=1")
    assert result.stdout.count(RESET) == 1, result.stdout
    expected, got = by_step(read_metrics(zero2)), by_step(read_metrics(run_dir))
    assert got.keys() == {3, 4}
    # step 3's loss is taken before any update: the adapter at resume is the checkpoint's
    assert abs(got[3] - expected[3]) < 1e-6, (got[3], expected[3])
    # step 4 follows fresh moments (AdamW's first step moves every element by about the lr)
    assert abs(got[4] - expected[4]) > 1e-5, (got[4], expected[4])
