"""The Hydra trainer on a mixture-of-experts model: ``model=tiny_qwen3_moe adapter=experts`` (BD-LoRA
on attention and on every expert of the fused ``mlp.experts`` tensors) under torchrun on CPU gloo, at
EP 2 (``parallel.tp=2 parallel.ep=2``: each rank holds 2 of the 4 experts) and at TP 2 (``parallel.ep=1``:
every expert split over both ranks). Training lowers the eval loss; an EP 2 run stopped halfway and
resumed equals the uninterrupted one exactly; the exported adapter (``peft-lora``: PEFT cannot load
``use_bdlora`` with ``target_parameters``) loads in PEFT with bdlora's logits; the run's plan lists the
expert tensors.

Four launches in all: the EP 2 run (the reference), the TP 2 run, and the halved EP 2 run and its resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bdlora import load_adapter
from bdlora.parallel.checkpoint import load_sharded_adapter, read_shard_meta
from bdlora.presets import build_model
from bdlora.train.checkpoint import complete_checkpoints, step_dir_name
from tests.conftest import logits
from tests.test_train import Run, by_step, output_of, read_metrics, train

PRESET = "tiny-qwen3-moe"
STEPS = 8
HALF = STEPS // 2
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYERS = 2
MOE_ARGS = [
    "model=tiny_qwen3_moe",
    "adapter=experts",  # nblocks 4: gate_up's gate and up halves split separately, 2 x tp / ep
    "checkpoint.export_format=peft-lora",  # PEFT cannot load use_bdlora with target_parameters
    "eval_every=4",
    "eval_batches=2",
    "data.num_examples=64",
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "logger.progress=false",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "optim.schedule=constant",  # the halved run's lr equals the full run's without a stretch
    f"checkpoint.every={HALF}",
    "checkpoint.keep_last=0",
]
EP2 = ["parallel.tp=2", "parallel.ep=2"]
TP2 = ["parallel.tp=2", "parallel.ep=1"]


def moe_run(tmp_path: Path, name: str, *overrides: str, steps: int = STEPS) -> Run:
    run_dir = tmp_path / name
    result = train(2, *MOE_ARGS, f"steps={steps}", *overrides, f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    return Run(tmp_path, run_dir, result, read_metrics(run_dir))


@pytest.fixture(scope="module")
def ep2(tmp_path_factory) -> Run:
    """The uninterrupted EP 2 run: the reference for the tests below."""
    return moe_run(tmp_path_factory.mktemp("moe"), "ep2", *EP2)


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint's adapter files, by file and key."""
    out = {}
    for path in sorted(checkpoint.glob("adapter-tp*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return out


def train_losses(run: Run) -> dict[int, float]:
    return by_step([r for r in run.metrics if "loss" in r])


def assert_eval_loss_fell(run: Run) -> None:
    evals = {r["step"]: r["eval_loss"] for r in run.metrics if "eval_loss" in r}
    assert evals.keys() == {0, HALF, STEPS}, run.metrics
    assert evals[STEPS] < evals[0], f"training did not lower the eval loss: {evals}"
    assert [r["step"] for r in run.metrics if "loss" in r] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_ep2_trains_the_experts_and_lowers_the_eval_loss(ep2):
    assert_eval_loss_fell(ep2)
    final = complete_checkpoints(ep2.run_dir / "checkpoints")[-1]
    assert final.name == step_dir_name(STEPS)
    meta = read_shard_meta(final)
    assert meta["tp"] == 2
    # the experts really ran expert-parallel: 2 groups of whole experts, gate_up split by segment
    experts = {f"model.layers.{i}.mlp.experts.{t}" for i in range(LAYERS) for t in EXPERT_TENSORS}
    assert meta["experts"].keys() == experts
    assert {name: layout["ep"] for name, layout in meta["experts"].items()} == dict.fromkeys(experts, 2)


@pytest.mark.slow
def test_tp2_trains_the_experts_and_lowers_the_eval_loss(ep2, tmp_path):
    tp2 = moe_run(tmp_path, "tp2", *TP2)

    assert_eval_loss_fell(tp2)
    meta = read_shard_meta(complete_checkpoints(tp2.run_dir / "checkpoints")[-1])
    assert {layout["ep"] for layout in meta["experts"].values()} == {1}
    # the same model and data split another way: EP 2's losses up to rounding
    expected = train_losses(ep2)
    assert train_losses(tp2).keys() == expected.keys()
    for step, loss in train_losses(tp2).items():
        assert abs(loss - expected[step]) < 1e-4, (step, loss, expected[step])


@pytest.mark.slow
def test_ep2_resumed_halfway_equals_the_uninterrupted_run(ep2, tmp_path):
    half = moe_run(tmp_path, "resumed", *EP2, steps=HALF)
    assert [r["step"] for r in half.metrics if "loss" in r] == list(range(1, HALF + 1))

    resumed = moe_run(tmp_path, "resumed", *EP2, "checkpoint.resume=auto")

    assert f"at step {HALF}" in resumed.result.stdout, output_of(resumed.result)
    assert [r["step"] for r in resumed.metrics if "loss" in r] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "eval_loss"):
        got = {r["step"]: r[key] for r in resumed.metrics if key in r}
        assert got == {r["step"]: r[key] for r in ep2.metrics if key in r}, key
    for step in (HALF, STEPS):
        name = step_dir_name(step)
        got = adapter_tensors(resumed.run_dir / "checkpoints" / name)
        reference = adapter_tensors(ep2.run_dir / "checkpoints" / name)
        assert got.keys() == reference.keys() and any("experts" in k for k in got), sorted(got)
        for key, value in got.items():
            assert torch.equal(value, reference[key]), (name, key)
    exported = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    reference = load_file(ep2.run_dir / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == reference.keys()
    for key, value in exported.items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.slow
def test_exported_expert_adapter_loads_in_peft_with_bdloras_logits(ep2):
    from peft import PeftModel

    adapter_dir = ep2.run_dir / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"experts.{t}" for t in EXPERT_TENSORS)
    assert not config.get("use_bdlora")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))

    peft_model = PeftModel.from_pretrained(build_model(PRESET, seed=0), str(adapter_dir)).eval()
    ours = load_adapter(build_model(PRESET, seed=0), adapter_dir).eval()
    expert_factors = [n for n, _ in peft_model.named_parameters() if "mlp.experts" in n and "lora_" in n]
    assert expert_factors, "PEFT built no adapter on the experts"

    expected = logits(ours, ids)
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=0, atol=1e-5)
    assert (expected - logits(build_model(PRESET, seed=0), ids)).abs().max() > 1e-3
    # the export is the trained adapter: the final sharded checkpoint gathered at TP 1 gives its logits
    sharded = build_model(PRESET, seed=0)
    load_sharded_adapter(sharded, complete_checkpoints(ep2.run_dir / "checkpoints")[-1])
    torch.testing.assert_close(logits(sharded.eval(), ids), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_run_plan_lists_the_expert_tensors_as_adapted(ep2):
    plan = json.loads((ep2.run_dir / "plan.json").read_text())
    modules = plan["modules"]

    for i in range(LAYERS):
        for leaf in ATTENTION:
            assert f"model.layers.{i}.self_attn.{leaf}" in modules
        assert modules[f"model.layers.{i}.mlp.experts.gate_up_proj"]["role"] == "column"
        assert modules[f"model.layers.{i}.mlp.experts.down_proj"]["role"] == "row"
    assert len(modules) == LAYERS * (len(ATTENTION) + len(EXPERT_TENSORS))
    assert plan["nblocks"] == 4
    assert f"adapter         {len(modules)} modules" in ep2.result.stdout


@pytest.mark.slow
def test_deepspeed_at_ep2_follows_the_native_run(ep2, tmp_path):
    """DeepSpeed (ZeRO 1, its TP group bdlora's) trains the expert adapters as the native engine does:
    every expert factor is marked TP-sharded, so its gradient norm sums over the TP group."""
    ds = moe_run(tmp_path, "ds", *EP2, "parallel.engine=deepspeed", "deepspeed=zero1")
    expected = train_losses(ep2)
    assert train_losses(ds).keys() == expected.keys()
    for step, loss in train_losses(ds).items():
        assert abs(loss - expected[step]) < 1e-4, (step, loss, expected[step])
