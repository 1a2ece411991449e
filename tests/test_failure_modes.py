"""A failed operation leaves the model as it was: no half-built, half-merged or empty adapters."""

from __future__ import annotations

import pytest
import torch

import bdlora.model
from bdlora import BDLoraConfig, BDLoraConfigError, apply_bdlora, merge_adapter, set_adapter
from bdlora.model import adapters_of, bdlora_layers
from bdlora.parallel import parallelize
from bdlora.parallel.checkpoint import load_sharded_adapter, save_sharded_adapter, shard_file_name
from tests.conftest import logits, randomize_lora_b, tiny_model


def adapter_names_on_layers(model) -> set[str]:
    return {name for _, layer in bdlora_layers(model) for name in layer.lora_A}


def test_apply_failing_midway_leaves_no_adapter_and_can_be_retried(monkeypatch, input_ids):
    model = tiny_model()
    apply_bdlora(model, BDLoraConfig(rank=4, nblocks=2), "first")
    real_init, calls = bdlora.model._init_adapter, []

    def failing_init(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("init failed")
        real_init(*args)

    monkeypatch.setattr(bdlora.model, "_init_adapter", failing_init)
    with pytest.raises(RuntimeError, match="init failed"):
        apply_bdlora(model, BDLoraConfig(rank=8, nblocks=2), "second")
    assert adapter_names_on_layers(model) == {"first"}
    assert list(adapters_of(model)) == ["first"]
    # the active adapter is still trainable after the failed call froze the model
    assert all(layer.lora_A["first"].requires_grad for _, layer in bdlora_layers(model))
    monkeypatch.setattr(bdlora.model, "_init_adapter", real_init)
    apply_bdlora(model, BDLoraConfig(rank=8, nblocks=2), "second")
    assert adapter_names_on_layers(model) == {"first", "second"}


def test_merging_an_adapter_on_some_layers_only(input_ids):
    model = tiny_model()
    apply_bdlora(model, BDLoraConfig(rank=4, nblocks=2), "all")
    apply_bdlora(model, BDLoraConfig(rank=4, nblocks=2, target_modules=["q_proj"]), "q_only")
    randomize_lora_b(model)
    set_adapter(model, "q_only")
    expected = logits(model, input_ids)
    merge_adapter(model, "q_only")
    merged = [name for name, layer in bdlora_layers(model) if layer.merged]
    assert merged and all(name.endswith("q_proj") for name in merged)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no adapter 'missing'"):
        merge_adapter(model, "missing")


@pytest.fixture
def slora_checkpoint(tmp_path):
    model = tiny_model()
    parallelize(model, sharding="slora")
    apply_bdlora(model, BDLoraConfig(rank=4, nblocks=2))
    save_sharded_adapter(model, tmp_path)
    return tmp_path


def test_sharded_load_of_the_wrong_sharding_changes_nothing(slora_checkpoint):
    model = tiny_model()
    with pytest.raises(BDLoraConfigError, match="'slora'-sharded adapter"):
        load_sharded_adapter(model, slora_checkpoint)
    assert not adapters_of(model) and not adapter_names_on_layers(model)


def test_sharded_load_with_a_missing_shard_leaves_no_adapter(slora_checkpoint):
    (slora_checkpoint / shard_file_name("adapter", 0, 1)).unlink()
    model = tiny_model()
    parallelize(model, sharding="slora")
    with pytest.raises(FileNotFoundError, match="incomplete sharded checkpoint"):
        load_sharded_adapter(model, slora_checkpoint)
    assert not adapters_of(model) and not adapter_names_on_layers(model)


def test_restoring_into_an_adapter_with_other_settings_names_them(tmp_path):
    from bdlora.parallel.checkpoint import restore_adapter_

    model = tiny_model()
    apply_bdlora(model, BDLoraConfig(rank=4, alpha=8, nblocks=2))
    save_sharded_adapter(model, tmp_path)
    other = tiny_model()
    apply_bdlora(other, BDLoraConfig(rank=4, alpha=16, nblocks=2))
    with pytest.raises(BDLoraConfigError, match=r"alpha=8 \(now 16\)"):
        restore_adapter_(other, tmp_path)
