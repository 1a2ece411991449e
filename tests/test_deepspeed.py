"""DeepSpeed as the training engine (real DeepSpeed, ``DS_ACCELERATOR=cpu``, gloo), against the native
engine: the same per-step losses and final adapter at DP 2, TP 2 and DP 2 x TP 2 under ZeRO 1 and 2
(clipping engaged), ZeRO 3 at DP 2 and its resume, a killed ZeRO 2 run resumed, the adapter adding
no TP collective, the ``replicated`` sharding at TP 2 and DP 2 x TP 2 under ZeRO 1 and 2 (its whole
factors' gradients summed over TP in backward, before DeepSpeed reduces them), and
``launch/deepspeed.sh``.

DeepSpeed compiles a CPU communication op on first use; ``TORCH_EXTENSIONS_DIR`` (set in
tests/conftest.py to ``<venv>/torch_extensions``) keeps it for later runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdlora.train.checkpoint import complete_checkpoints, step_dir_name
from bdlora.train.config import TrainConfig, TrainConfigError
from bdlora.train.deepspeed_engine import build_ds_config, check_engine_layout
from tests.test_train import (
    adapter_state,
    by_step,
    interrupt,
    output_of,
    read_metrics,
    train,
    train_env,
)

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "experiment=demo",
    "steps=4",
    "eval_every=0",
    "data.num_examples=300",
    "data.seq_len=32",
    "data.micro_batch_size=4",  # per DP rank: DP 2 takes the reference's 8 rows per step
    "logger.progress=false",
    "logger.comm_every=1",
    "optim.lr=1e-2",
    "optim.max_grad_norm=0.05",  # small enough that clipping engages on every step
    "checkpoint.every=2",
    "checkpoint.keep_last=0",
]
LAYOUTS = {"dp2": (2, 1), "tp2": (2, 2), "dp2xtp2-vocab-sequence": (4, 2), "dp2xtp2": (4, 2)}
# the vocabulary- and sequence-parallel layout under ZeRO: the same trajectory as the others
VOCAB_SEQUENCE = ["parallel.vocab_parallel=true", "parallel.sequence_parallel=true"]


def trained(tmp: Path, name: str, nproc: int, *overrides: str) -> Path:
    run_dir = tmp / name
    result = train(nproc, *ARGS, *overrides, f"run_dir={run_dir}", cwd=tmp)
    assert result.returncode == 0, output_of(result)
    return run_dir


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return adapter_state(complete_checkpoints(run_dir / "checkpoints")[-1])


def exported_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter the run exported at its end (PEFT's plain LoRA for ``replicated``, whose sharded
    checkpoint loads only into a model sharded the same way)."""
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(
    got: Path, expected: Path, name: str, same_tp: Path | None = None, adapter_of=final_adapter
) -> None:
    """Losses and grad norms as the one-process native run ``expected``; the final adapter as the
    native run at the same TP degree (``same_tp``, default ``expected``): TP changes the order of
    the sums, and AdamW normalises each element's gradient, so across TP degrees rounding noise on
    near-zero gradients (B starts at 0) moves a few elements by ~2e-5 in four steps at lr 1e-2."""
    losses, reference = by_step(read_metrics(got)), by_step(read_metrics(expected))
    assert losses.keys() == reference.keys() == {1, 2, 3, 4}
    for step, loss in reference.items():
        assert abs(losses[step] - loss) < 1e-5, (name, step, losses[step], loss)
    norms = by_step(read_metrics(expected), "grad_norm")
    assert all(norm > 0.05 for norm in norms.values()), "clipping never engaged"
    torch.testing.assert_close(
        by_step(read_metrics(got), "grad_norm"), norms, rtol=1e-5, atol=1e-6, msg=f"{name} grad norms"
    )
    reference_adapter, adapter = adapter_of(same_tp or expected), adapter_of(got)
    assert adapter and adapter.keys() == reference_adapter.keys(), name
    for key, value in adapter.items():
        torch.testing.assert_close(value, reference_adapter[key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict[str, Path]:
    """The native engine: one process with the whole batch, and TP 2 (for the collective count)."""
    tmp = tmp_path_factory.mktemp("native")
    return {
        "reference": trained(tmp, "reference", 1, "parallel.tp=1", "data.micro_batch_size=8"),
        "tp2": trained(tmp, "tp2", 2, "parallel.tp=2", "data.micro_batch_size=8"),
    }


@pytest.fixture(scope="module")
def native_replicated(tmp_path_factory) -> Path:
    """The native engine with the ``replicated`` sharding at TP 2 (its bucketed TP sum), whole batch."""
    tmp = tmp_path_factory.mktemp("native-replicated")
    return trained(tmp, "tp2", 2, "parallel.tp=2", "parallel.sharding=replicated", "data.micro_batch_size=8")


# --- tier 1: the config the trainer derives ------------------------------------------------------


def test_deepspeed_config_comes_from_the_trainer_settings(tmp_path):
    cfg = TrainConfig()
    cfg.deepspeed.config = {"zero_optimization": {"stage": 2}}
    out = build_ds_config(cfg, dp_size=2)
    assert out["train_micro_batch_size_per_gpu"] == cfg.data.micro_batch_size
    assert out["train_batch_size"] == cfg.data.micro_batch_size * cfg.optim.grad_accum * 2
    assert out["gradient_clipping"] == cfg.optim.max_grad_norm
    assert out["zero_optimization"] == {"stage": 2}
    user = tmp_path / "ds.json"
    user.write_text('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}}')
    cfg.deepspeed.config_file = str(user)
    with pytest.raises(
        TrainConfigError, match=r"gradient_accumulation_steps=4, but optim.grad_accum gives 1"
    ):
        build_ds_config(cfg, dp_size=2)
    user.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(TrainConfigError, match=r"'optimizer' section; the trainer's optim.lr"):
        build_ds_config(cfg, dp_size=2)


def test_zero3_under_tp_is_refused_before_anything_is_built():
    cfg = TrainConfig()
    cfg.deepspeed.config = {"zero_optimization": {"stage": 3}}
    assert build_ds_config(cfg, dp_size=2)["zero_optimization"] == {"stage": 3}  # TP 1: fine
    cfg.parallel.tp = 2
    with pytest.raises(
        TrainConfigError, match=r"ZeRO stage 3 \(deepspeed=zero3\) with parallel.tp=2: .* zero2"
    ):
        build_ds_config(cfg, dp_size=2)


def test_an_engine_on_the_wrong_groups_is_refused():
    class Ctx:
        dp_size = 1

        class tp:  # noqa: N801
            size = 2

    check_engine_layout(1, 2, Ctx)
    with pytest.raises(TrainConfigError, match=r"DeepSpeed runs at dp=2 x tp=1 but the mesh is dp=1 x tp=2"):
        check_engine_layout(2, 1, Ctx)


# --- real DeepSpeed runs -----------------------------------------------------------------------------


# Each layout once, the stages spread over them (every stage partitions over the DP group alone;
# DP 2 x TP 1 under ZeRO 1 runs through launch/deepspeed.sh, in the launcher's test below).
CASES = [("dp2", 2), ("tp2", 1), ("dp2xtp2-vocab-sequence", 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "stage"), CASES)
def test_zero_matches_the_native_engine(native, tmp_path, layout, stage):
    nproc, tp = LAYOUTS[layout]
    micro = 8 // (nproc // tp)  # 8 rows per step over the DP ranks, as in the reference
    ds_args = ["parallel.engine=deepspeed", f"deepspeed=zero{stage}", f"parallel.tp={tp}"]
    ds_args += VOCAB_SEQUENCE if layout.endswith("vocab-sequence") else []
    run = trained(tmp_path, "ds", nproc, *ds_args, f"data.micro_batch_size={micro}")
    same_tp = native["tp2"] if tp == 2 else native["reference"]
    assert_same_run(run, native["reference"], f"{layout} zero{stage}", same_tp)
    if layout == "tp2":  # the adapter adds no TP collective under DeepSpeed either
        first = read_metrics(run)[0]
        expected = read_metrics(native["tp2"])[0]
        assert (first["tp_collectives"], first["tp_bytes"]) == (
            expected["tp_collectives"],
            expected["tp_bytes"],
        )


@pytest.mark.slow
def test_zero3_at_dp2_and_a_resume_continue_the_native_trajectory(native, tmp_path):
    run = trained(tmp_path, "zero3", 2, "parallel.engine=deepspeed", "deepspeed=zero3", "parallel.tp=1")
    assert_same_run(run, native["reference"], "zero3")
    # resume from the step-2 checkpoint: the same losses and adapter as the uninterrupted run
    resumed = tmp_path / "resumed"
    saved = step_dir_name(2)
    shutil.copytree(run / "checkpoints" / saved, resumed / "checkpoints" / saved)
    result = train(
        2,
        *ARGS,
        "parallel.engine=deepspeed",
        "deepspeed=zero3",
        "parallel.tp=1",
        "checkpoint.resume=auto",
        f"run_dir={resumed}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, output_of(result)
    assert "at step 2" in result.stdout
    expected = by_step(read_metrics(run))
    got = by_step(read_metrics(resumed))
    assert got.keys() == {3, 4}
    for step, loss in got.items():
        assert abs(loss - expected[step]) < 1e-6, (step, loss, expected[step])
    reference = final_adapter(run)
    for key, value in final_adapter(resumed).items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.slow
def test_deepspeed_launcher_script_trains_two_processes(native, tmp_path):
    run_dir = tmp_path / "run"
    env = {**train_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        [str(ROOT / "launch" / "deepspeed.sh"), *ARGS, "parallel.tp=1", f"run_dir={run_dir}"],
        env={**env, "MASTER_PORT": env["MASTER_PORT"]},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, output_of(result)
    assert "mesh            dp=2 x tp=1" in result.stdout
    assert_same_run(run_dir, native["reference"], "launcher")


@pytest.mark.slow
def test_kill_and_resume_under_deepspeed_reproduces_the_uninterrupted_losses(tmp_path):
    args = [a for a in ARGS if a != "steps=4"]
    args += ["steps=12", "parallel.engine=deepspeed", "deepspeed=zero2", "parallel.tp=1"]
    reference = tmp_path / "uninterrupted"
    first = train(2, *args, f"run_dir={reference}", cwd=tmp_path)
    assert first.returncode == 0, output_of(first)
    run_dir = tmp_path / "interrupted"
    proc, seen = interrupt(2, args, run_dir, after_step=5)
    assert seen >= 5 and proc.returncode != 0, (tmp_path / "interrupted.log").read_text()
    assert read_metrics(run_dir)[-1]["step"] < 12, "the run ended before the interrupt"
    result = train(2, *args, "checkpoint.resume=auto", f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    expected, got = by_step(read_metrics(reference)), by_step(read_metrics(run_dir))
    assert got.keys() == expected.keys() == set(range(1, 13))
    for step, loss in got.items():
        assert abs(loss - expected[step]) < 1e-6, (step, loss, expected[step])


def test_a_deepspeed_checkpoint_resumes_only_at_its_layout(tmp_path):
    from types import SimpleNamespace

    from bdlora.train.checkpoint import CheckpointDamaged, Checkpointer

    ctx = SimpleNamespace(run_dir=tmp_path, world_size=2, tp=SimpleNamespace(size=1))
    checkpointer = Checkpointer(ctx, engine=SimpleNamespace(load_checkpoint=None))
    (tmp_path / "deepspeed").mkdir()
    with pytest.raises(ValueError, match=r"world size 4, tp=2; now 2, tp=1.*parallel.engine=native"):
        checkpointer._restore_engine(tmp_path, {"world_size": 4, "tp": 2})
    (tmp_path / "deepspeed").rmdir()
    with pytest.raises(CheckpointDamaged, match="written by the native engine"):
        checkpointer._restore_engine(tmp_path, {"world_size": 2, "tp": 1})


# Both layouts under both stages. ZeRO 1 reduces the gradients in engine.backward; ZeRO 2 in its
# post-accumulate-grad hooks whenever a bucket fills, here in mid-backward (buckets of 1000 elements, a
# factor has 512), and with the optimizer offloaded it then copies each reduced gradient out and
# takes its norm: a TP sum after backward (the native engine's) would be lost, silently.
REDUCE_IN_BACKWARD = [
    "+deepspeed.config.zero_optimization.reduce_bucket_size=1000",
    "+deepspeed.config.zero_optimization.offload_optimizer={device: cpu}",
    "+deepspeed.config.zero_force_ds_cpu_optimizer=false",  # offload with the trainer's torch AdamW
]
REPLICATED_CASES = [("tp2", 1), ("tp2", 2), ("dp2xtp2", 1), ("dp2xtp2", 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "stage"), REPLICATED_CASES)
def test_replicated_sharding_under_zero_matches_the_native_engine(native_replicated, tmp_path, layout, stage):
    """The losses, grad norms (clipping engaged: the replicated factors counted once, the sharded
    ones over TP) and final adapter of the native engine's ``replicated`` run."""
    nproc, tp = LAYOUTS[layout]
    micro = 8 // (nproc // tp)
    ds_args = ["parallel.engine=deepspeed", f"deepspeed=zero{stage}", f"parallel.tp={tp}"]
    ds_args += REDUCE_IN_BACKWARD if stage == 2 else []
    run = trained(
        tmp_path, "ds", nproc, *ds_args, "parallel.sharding=replicated", f"data.micro_batch_size={micro}"
    )
    assert_same_run(run, native_replicated, f"replicated {layout} zero{stage}", adapter_of=exported_adapter)
    # one all-reduce per whole factor in backward for the native engine's one flat one
    factors = len(json.loads((run / "plan.json").read_text())["modules"])
    first, expected = read_metrics(run)[0], read_metrics(native_replicated)[0]
    assert first["tp_collectives"] == expected["tp_collectives"] - 1 + factors, (first, expected, factors)
    if layout == "tp2":  # the same rows per rank: the same bytes
        assert first["tp_bytes"] == expected["tp_bytes"]
