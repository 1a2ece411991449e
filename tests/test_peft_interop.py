"""Adapters round-trip through PEFT's on-disk format, both ways, with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import BdLoraConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from bdlora import (
    BDLoraConfig,
    BDLoraConfigError,
    Role,
    apply_bdlora,
    load_adapter,
    merge_adapter,
    resolve_plan,
    save_adapter,
    unmerge_adapter,
)
from bdlora.model import adapters_of, bdlora_layers
from bdlora.peft_io import WEIGHTS_NAME
from tests.conftest import LINEAR_LEAVES, TINY_MODELS, logits, peft_layout, randomize_lora_b, tiny_model

ATOL = dict(atol=1e-5, rtol=0)
CONFIG = BDLoraConfig(
    rank=8,
    alpha=16,
    nblocks=2,
    patterns={
        r"layers\.0\.self_attn\.q_proj": {"rank": 4, "alpha": 4},
        "v_proj": {"rank": 6, "alpha": 24},
        r"layers\.1\.mlp\.down_proj": None,
        "up_proj": {"alpha": 8},
    },
)
EXCLUDED = "model.layers.1.mlp.down_proj"
Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def adapted_model(name: str) -> nn.Module:
    model = apply_bdlora(tiny_model(name), CONFIG)
    randomize_lora_b(model)
    return model


@pytest.fixture(params=TINY_MODELS)
def model_name(request) -> str:
    return request.param


def expected_layout(name: str, dense: bool) -> dict[str, tuple]:
    """The (rank, alpha, block-diagonal role) PEFT must build, from bdlora's own plan."""
    plan = resolve_plan(tiny_model(name), CONFIG)
    return {m.name: (m.rank, float(m.settings.alpha), None if dense else m.role) for m in plan.modules}


@pytest.mark.parametrize("fmt", ["peft-bdlora", "peft-lora"])
def test_vanilla_peft_loads_a_saved_adapter(model_name, fmt, tmp_path, input_ids):
    model = adapted_model(model_name)
    save_adapter(model, tmp_path, format=fmt)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["use_bdlora"] is None) == (fmt == "peft-lora")
    peft_model = PeftModel.from_pretrained(tiny_model(model_name), tmp_path)
    layout = peft_layout(peft_model)
    assert EXCLUDED not in layout
    assert layout == expected_layout(model_name, dense=fmt == "peft-lora")
    assert_close(logits(peft_model, input_ids), logits(model, input_ids), **ATOL)
    assert not torch.allclose(
        logits(peft_model, input_ids), logits(tiny_model(model_name), input_ids), atol=1e-3
    )


@pytest.mark.parametrize("fmt", ["peft-bdlora", "peft-lora"])
def test_load_adapter_reproduces_logits(model_name, fmt, tmp_path, input_ids):
    model = adapted_model(model_name)
    save_adapter(model, tmp_path, format=fmt)
    loaded = load_adapter(tiny_model(model_name), tmp_path)
    assert_close(logits(loaded, input_ids), logits(model, input_ids), **ATOL)
    plan = adapters_of(loaded)["default"].plan
    assert plan.global_nblocks == (2 if fmt == "peft-bdlora" else 1)
    assert EXCLUDED not in plan.names
    assert {m.name: m.rank for m in plan.modules} == {
        m.name: m.rank for m in adapters_of(model)["default"].plan.modules
    }
    if fmt == "peft-bdlora":
        for (_, ours), (_, theirs) in zip(bdlora_layers(model), bdlora_layers(loaded)):
            assert_close(theirs.lora_A["default"], ours.lora_A["default"], atol=0, rtol=0)
            assert_close(theirs.lora_B["default"], ours.lora_B["default"], atol=0, rtol=0)


def test_peft_trained_bdlora_adapter_loads(model_name, tmp_path, input_ids):
    lora_config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(LINEAR_LEAVES),
        use_bdlora=BdLoraConfig(
            target_modules_bd_a=["o_proj", "down_proj"],
            target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
            nblocks=2,
        ),
        rank_pattern={"q_proj": 4},
    )
    peft_model = get_peft_model(tiny_model(model_name), lora_config)
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(model_name), tmp_path)
    plan = adapters_of(loaded)["default"].plan
    assert {m.name: (m.rank, float(m.settings.alpha), m.role) for m in plan.modules} == peft_layout(
        peft_model
    )
    assert plan["model.layers.1.self_attn.q_proj"].rank == 4
    assert plan["model.layers.1.mlp.down_proj"].role is Role.ROW
    assert_close(logits(loaded, input_ids), logits(peft_model, input_ids), **ATOL)
    assert not torch.allclose(logits(loaded, input_ids), logits(tiny_model(model_name), input_ids), atol=1e-3)


def test_merge_gives_unmerged_logits(model_name, input_ids):
    model = adapted_model(model_name)
    weights = {n: layer.weight.detach().clone() for n, layer in bdlora_layers(model)}
    unmerged = logits(model, input_ids)
    merge_adapter(model)
    assert all(layer.merged == ["default"] for _, layer in bdlora_layers(model))
    assert_close(logits(model, input_ids), unmerged, **ATOL)
    unmerge_adapter(model)
    for name, layer in bdlora_layers(model):
        assert_close(layer.weight, weights[name], atol=1e-6, rtol=0)
    assert_close(logits(model, input_ids), unmerged, **ATOL)


# -- load errors -------------------------------------------------------------------------------


@pytest.fixture
def saved_dir(tmp_path):
    return save_adapter(adapted_model("tiny-llama"), tmp_path / "good")


def edit_tensors(directory, edit) -> None:
    path = directory / WEIGHTS_NAME
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def assert_left_unchanged(model: nn.Module, input_ids: torch.Tensor) -> None:
    """A failed load adds no adapter: the model still computes the base logits."""
    assert adapters_of(model) == {}
    assert_close(logits(model, input_ids), logits(tiny_model(), input_ids), **ATOL)


def test_load_from_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), tmp_path / "missing")


def test_load_without_weights_file(saved_dir):
    (saved_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(tiny_model(), saved_dir)


def test_load_wrong_shape_names_tensor_and_module(saved_dir, input_ids):
    edit_tensors(saved_dir, lambda t: t.update({Q_KEY: t[Q_KEY][:2].contiguous()}))
    model = tiny_model()
    with pytest.raises(BDLoraConfigError) as err:
        load_adapter(model, saved_dir)
    message = str(err.value)
    assert repr(Q_KEY) in message and "module 'model.layers.0.self_attn.q_proj'" in message
    assert "(2, 64)" in message and "(4, 64)" in message
    assert_left_unchanged(model, input_ids)


def test_load_extra_tensor_is_an_error(saved_dir, input_ids):
    extra = "base_model.model.lm_head.lora_A.weight"
    edit_tensors(saved_dir, lambda t: t.update({extra: torch.zeros(8, 64)}))
    model = tiny_model()
    with pytest.raises(BDLoraConfigError, match=rf"1 tensors match no adapted module \(first: '{extra}'\)"):
        load_adapter(model, saved_dir)
    assert_left_unchanged(model, input_ids)


def test_load_missing_tensor_is_an_error(saved_dir, input_ids):
    edit_tensors(saved_dir, lambda t: t.pop(Q_KEY))
    model = tiny_model()
    with pytest.raises(BDLoraConfigError, match=rf"missing tensor '{Q_KEY}'"):
        load_adapter(model, saved_dir)
    assert_left_unchanged(model, input_ids)


def test_a_failed_load_can_be_retried(saved_dir, tmp_path, input_ids):
    good = adapted_model("tiny-llama")
    bad_dir = tmp_path / "bad"
    save_adapter(good, bad_dir)
    edit_tensors(bad_dir, lambda t: t.pop(Q_KEY))
    model = tiny_model()
    with pytest.raises(BDLoraConfigError):
        load_adapter(model, bad_dir)
    load_adapter(model, saved_dir)
    assert_close(logits(model, input_ids), logits(good, input_ids), **ATOL)


def test_unknown_save_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'safetensors'"):
        save_adapter(adapted_model("tiny-llama"), tmp_path, format="safetensors")


def test_a_peft_config_with_the_bd_lists_swapped_is_named():
    """PEFT's per-field help puts o/down in target_modules_bd_b; the model's TP plan makes them row
    layers (block-diagonal A): the plan says which modules, and how to fix the config."""
    import warnings

    from bdlora.plan import resolve_plan

    def peft_config(bd_a: list[str], bd_b: list[str]) -> dict:
        return {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "o_proj"],
            "use_bdlora": {"target_modules_bd_a": bd_a, "target_modules_bd_b": bd_b, "nblocks": 2},
        }

    model = tiny_model("tiny-llama")
    named = r"TP plan: 'model\.layers\.0\.self_attn\.q_proj' \(row; plan: colwise\).*swap the two lists"
    with pytest.warns(UserWarning, match=named):
        plan = resolve_plan(model, BDLoraConfig.from_peft(peft_config(["q_proj"], ["o_proj"])))
    assert any("against the TP plan" in note for note in plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_plan(model, BDLoraConfig.from_peft(peft_config(["o_proj"], ["q_proj"])))
