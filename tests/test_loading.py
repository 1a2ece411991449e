"""What ``bdlora.from_pretrained`` guarantees about every tensor it builds (tier 1, one process).

A model class of this test's own, registered with transformers' Auto classes as a user's would be,
carries what the architectures of transformers may carry: a learned 0-dim scalar and a buffer its
constructor computes. A variant that leaves a buffer on the meta device stands for any tensor
neither stored nor computed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import bdlora
from tests.architectures import TINY, batch, eval_logits


class ScalarConfig(LlamaConfig):
    model_type = "bdlora_test_scalar"


class ScalarLM(LlamaForCausalLM):
    """Llama whose logits are scaled by a learned 0-dim parameter and a computed buffer."""

    config_class = ScalarConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("offset", torch.linspace(-1, 1, config.vocab_size), persistent=False)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.temperature + self.offset
        return out


class UnsetConfig(LlamaConfig):
    model_type = "bdlora_test_unset"


class UnsetLM(LlamaForCausalLM):
    """A buffer that neither the checkpoint holds nor the constructor computes."""

    config_class = UnsetConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self.register_buffer("table", torch.empty(4, device="meta"), persistent=False)


for config_cls, model_cls in ((ScalarConfig, ScalarLM), (UnsetConfig, UnsetLM)):
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def save(model_cls, config_cls, path) -> nn.Module:
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY)).eval()
    if hasattr(model, "temperature"):
        with torch.no_grad():
            model.temperature.fill_(2.5)  # a value no initialisation produces
    model.save_pretrained(path)
    return model


def test_a_scalar_parameter_is_read_and_a_computed_buffer_is_kept(tmp_path):
    reference = save(ScalarLM, ScalarConfig, tmp_path)
    model = bdlora.from_pretrained(tmp_path, bdlora.BDLoraConfig(rank=4, nblocks=2))
    assert model.temperature.item() == 2.5
    torch.testing.assert_close(model.offset, reference.offset, atol=0, rtol=0)
    torch.testing.assert_close(eval_logits(model, batch()), eval_logits(reference, batch()))


def test_a_tensor_neither_read_nor_computed_is_refused_by_name(tmp_path):
    save(UnsetLM, UnsetConfig, tmp_path)
    with pytest.raises(RuntimeError, match=r"neither read from the checkpoint nor computed.*'table'"):
        bdlora.from_pretrained(tmp_path)


def test_a_checkpoint_tensor_of_another_shape_is_refused_by_name(tmp_path):
    save(LlamaForCausalLM, LlamaConfig, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP weights are 128 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' gives this rank \(128, 64\)"
    ):
        bdlora.from_pretrained(tmp_path)
