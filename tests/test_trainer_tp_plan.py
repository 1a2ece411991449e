"""The trainer's ``parallel.tp_plan``: checked up front naming the key, handed to the model builder
as a plain dict, honoured on resume; and GLM-4 trained at TP 2 with its MLP packed (``packed_colwise``
gate_up_proj, ``rowwise`` down_proj) on the same losses as at TP 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bdlora import BDLoraConfig, resolve_plan
from bdlora.parallel.checkpoint import read_shard_meta
from bdlora.parallel.comm import TPGroup
from bdlora.state import state_of
from bdlora.train.checkpoint import STATE, complete_checkpoints, step_dir_name
from bdlora.train.config import ModelConfig, TrainConfig, TrainConfigError, check_ranges, load_train_config
from bdlora.train.context import RunContext
from bdlora.train.modeling import build_model, parallel_layout
from bdlora.train.run import check_resumed_plan
from tests.architectures import tiny_config
from tests.test_train import by_step, compose_train, output_of, read_metrics, train

GLM4_OWN_PLAN = AutoConfig.for_model("glm4").base_model_tp_plan
PACKED_PLAN = {
    **{f"layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"},
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_up_proj": "packed_colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
# the form a user types: Hydra's dict syntax, keys with dots and stars unquoted
PACKED_OVERRIDE = "parallel.tp_plan={" + ", ".join(f"{k}: {v}" for k, v in PACKED_PLAN.items()) + "}"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory) -> Path:
    """A tiny GLM-4 saved as a hub checkpoint would be (byte vocabulary, so ``model.tokenizer=bytes``)."""
    config = tiny_config("glm4")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("glm4")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


# --- tier 1: validation and hand-off, no process group ------------------------------------------


@pytest.mark.parametrize(
    ("tp_plan", "message"),
    [
        ("colwise", "parallel.tp_plan must be a non-empty mapping"),
        ({}, "parallel.tp_plan must be a non-empty mapping"),
        (
            {"layers.*.mlp.gate_up_proj": "packed_colwize"},
            "parallel.tp_plan['layers.*.mlp.gate_up_proj'] = 'packed_colwize' is not a TP style",
        ),
    ],
)
def test_a_bad_plan_is_refused_before_anything_is_built(tp_plan, message):
    cfg = TrainConfig()
    cfg.parallel.tp_plan = tp_plan

    with pytest.raises(TrainConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_ranges(cfg)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("parallel.tp_plan=colwise", ["parallel.tp_plan", "'colwise'"]),
        ("+parallel.tp_plan={layers.*.mlp.up_proj: sideways}", ["parallel.tp_plan", "up_proj", "'sideways'"]),
    ],
)
def test_a_bad_plan_on_the_command_line_names_the_key(override, words):
    with pytest.raises(TrainConfigError) as info:
        load_train_config(compose_train([override]))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_the_command_line_and_the_yaml_option_give_the_same_plain_dict():
    typed = load_train_config(compose_train([PACKED_OVERRIDE]))
    added = load_train_config(compose_train(["+" + PACKED_OVERRIDE]))
    option = load_train_config(compose_train(["parallel=tp2_glm4_packed"]))

    assert typed.parallel.tp_plan == added.parallel.tp_plan == option.parallel.tp_plan == PACKED_PLAN
    assert type(parallel_layout(typed.parallel)["tp_plan"]) is dict
    assert option.parallel.tp == 2
    assert load_train_config(compose_train([])).parallel.tp_plan is None


def _tp1_context(run_dir: Path) -> RunContext:
    return RunContext(
        mesh=None,
        tp=TPGroup(None),
        dp_rank=0,
        dp_size=1,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        run_dir=run_dir,
    )


def test_the_plan_reaches_the_model_builder(glm4_dir, tmp_path):
    train_cfg = load_train_config(
        compose_train([PACKED_OVERRIDE, f"adapter.target_modules=[{','.join(TARGETS)}]", "adapter.nblocks=4"])
    )
    model_cfg = ModelConfig(source="path", path=str(glm4_dir))

    model = build_model(
        model_cfg,
        train_cfg.adapter.build(),
        _tp1_context(tmp_path),
        glm4_dir,
        parallel_layout(train_cfg.parallel),
    )

    assert model.config.base_model_tp_plan == PACKED_PLAN
    (adapter,) = state_of(model).adapters.values()
    sources = {m.name.split(".", 3)[-1]: m.role_source for m in adapter.plan.modules if ".0." in m.name}
    assert sources["mlp.gate_up_proj"] == "tp_plan:packed_colwise"
    assert sources["mlp.down_proj"] == "tp_plan:rowwise"  # GLM-4's own says rowwise_split_input


# --- tier 1: resuming under another plan --------------------------------------------------------


def _checkpoint_saved_with(tmp_path: Path, tp_plan: dict | None) -> Path:
    checkpoint = tmp_path / step_dir_name(2)
    checkpoint.mkdir()
    (checkpoint / STATE).write_text(json.dumps({"config": {"parallel": {"tp_plan": tp_plan}}}))
    return checkpoint


def _adapter_plan(glm4_dir: Path, tp_plan: dict):
    config = AutoConfig.from_pretrained(glm4_dir)
    config.base_model_tp_plan = tp_plan
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return resolve_plan(model, BDLoraConfig(rank=8, nblocks=4, target_modules=TARGETS))


@pytest.mark.parametrize("saved", [None, GLM4_OWN_PLAN])
def test_resume_may_change_the_plan_where_every_module_keeps_its_role(glm4_dir, tmp_path, saved):
    checkpoint = _checkpoint_saved_with(tmp_path, saved)
    plan = _adapter_plan(glm4_dir, PACKED_PLAN)

    check_resumed_plan(checkpoint, PACKED_PLAN, GLM4_OWN_PLAN, plan, deepspeed=False)
    # the same plan, once as the model's own (null) and once given, is no change even for DeepSpeed
    check_resumed_plan(checkpoint, GLM4_OWN_PLAN, GLM4_OWN_PLAN, plan, deepspeed=True)


def test_resume_refuses_a_plan_that_moves_a_module_between_column_and_row(glm4_dir, tmp_path):
    checkpoint = _checkpoint_saved_with(tmp_path, None)
    swapped = {**PACKED_PLAN, "layers.*.self_attn.o_proj": "colwise"}

    with pytest.raises(TrainConfigError, match=r"model\.layers\.0\.self_attn\.o_proj \(row -> column\)"):
        check_resumed_plan(
            checkpoint, swapped, GLM4_OWN_PLAN, _adapter_plan(glm4_dir, swapped), deepspeed=False
        )


def test_resume_under_deepspeed_refuses_any_change_of_plan(glm4_dir, tmp_path):
    checkpoint = _checkpoint_saved_with(tmp_path, None)

    with pytest.raises(
        TrainConfigError, match="DeepSpeed .* resume with that plan, or with parallel.engine=native"
    ):
        check_resumed_plan(checkpoint, PACKED_PLAN, GLM4_OWN_PLAN, _adapter_plan(glm4_dir, PACKED_PLAN), True)


# --- the trainer under torchrun -----------------------------------------------------------------


def _glm4_args(glm4_dir: Path) -> list[str]:
    return [
        "model.source=path",
        f"model.path={glm4_dir}",
        "model.tokenizer=bytes",
        f"adapter.target_modules=[{','.join(TARGETS)}]",
        "adapter.nblocks=4",  # packed: a multiple of 2 segments x TP 2
        PACKED_OVERRIDE,
        "steps=3",
        "eval_every=0",
        "eval_batches=1",
        "data.num_examples=64",
        "data.seq_len=32",
        "data.micro_batch_size=4",
        "logger.progress=false",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "checkpoint.every=2",
    ]


@pytest.mark.slow
def test_glm4_with_a_packed_mlp_trains_at_tp2_on_the_tp1_losses(glm4_dir, tmp_path):
    """TP 2 under torchrun with gate_up_proj packed_colwise and down_proj rowwise: the losses of
    TP 1; and its step-2 checkpoint resumes at TP 1 under GLM-4's own plan on the same step 3."""
    args = _glm4_args(glm4_dir)
    runs = {}
    for tp in (1, 2):
        run_dir = tmp_path / f"tp{tp}"
        result = train(tp, *args, f"parallel.tp={tp}", f"run_dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, output_of(result)
        runs[tp] = by_step(read_metrics(run_dir))

    assert runs[1].keys() == runs[2].keys() == {1, 2, 3}
    for step, loss in runs[1].items():
        assert abs(runs[2][step] - loss) < 1e-5, (step, runs[2][step], loss)
    assert runs[1][3] < runs[1][1] - 1e-3  # the adapter trained: equal losses are not equal constants
    saved = complete_checkpoints(tmp_path / "tp2" / "checkpoints")[0]
    packed = {f"model.layers.{i}.mlp.gate_up_proj": 2 for i in range(2)}
    assert read_shard_meta(saved)["packed_segments"] == packed  # TP 2 really ran the packed plan

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(saved, resumed_dir / "checkpoints" / saved.name)
    own_plan = [a for a in args if not a.startswith("parallel.tp_plan=")]
    result = train(1, *own_plan, "checkpoint.resume=auto", f"run_dir={resumed_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert "saved at tp=2" in result.stdout
    resumed = by_step(read_metrics(resumed_dir))
    assert resumed.keys() == {3}
    assert abs(resumed[3] - runs[2][3]) < 1e-5, (resumed[3], runs[2][3])
