"""``merge_streaming`` folds per-expert adapters into a MoE checkpoint in the checkpoint's own layout.

Tiny random Mixtral (per-expert ``w1``/``w3``/``w2``), Qwen2-MoE (per-expert ``gate/up/down_proj``
plus a shared expert, a plain MLP) and gpt-oss (fused, transposed ``(E, H, 2I)``) models are saved
by transformers, adapted by bdlora (attention, shared expert and expert tensors) and their adapter
written as a sharded checkpoint; the merged directory must load in plain transformers with
bdlora's base+adapter logits, under the source's keys, with untouched tensors bytewise unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
from bdlora import BDLoraConfig
from bdlora.model import adapters_of, bdlora_layers
from bdlora.parallel.checkpoint import save_sharded_adapter
from bdlora.parallel.conversion import CheckpointIndex
from bdlora.train.export import merge_streaming

TINY = dict(
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=64,
    num_experts_per_tok=2,
)
ARCHS = {
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "gpt_oss": dict(num_local_experts=4),
}
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def stored(directory: Path) -> dict[str, bytes]:
    """Key -> raw bytes of every tensor in ``directory``'s safetensors files."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no iter)
                out[key] = handle.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


@pytest.fixture(scope="module", params=sorted(ARCHS))
def merged(request, tmp_path_factory):
    """(source dir, merged dir, bdlora's adapted model) for one architecture."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    source, checkpoint, out = root / "base", root / "ckpt", root / "merged"
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **ARCHS[model_type])
    AutoModelForCausalLM.from_config(config).save_pretrained(source)

    adapter = BDLoraConfig(rank=4, nblocks=2, target_parameters=["gate_up_proj", "down_proj"])
    model = bdlora.from_pretrained(source, adapter).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in bdlora_layers(model):
            for name in layer.lora_A:
                a, b = layer.lora_A[name], layer.lora_B[name]
                layer.set_factors(name, a, torch.randn(b.shape, generator=gen) * 0.1)
    save_sharded_adapter(model, checkpoint)
    out.mkdir()
    merge_streaming(source, checkpoint, out)
    return source, out, model


def test_merged_logits_equal_bdlora(merged) -> None:
    source, out, model = merged
    adapted = {m.name for m in adapters_of(model)["default"].plan.modules}
    assert {GATE_UP, GATE_UP.replace("gate_up", "down"), "model.layers.1.self_attn.q_proj"} <= adapted
    if model.config.model_type == "qwen2_moe":  # the shared expert's plain linears too
        assert "model.layers.1.mlp.shared_expert.gate_proj" in adapted
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(source).eval()(input_ids=IDS).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter changes the output
    assert_close(got, want, atol=1e-5, rtol=0)


def test_layout_kept_and_untouched_tensors_unchanged(merged) -> None:
    source, out, model = merged
    before, after = stored(source), stored(out)
    assert list(after) == list(before)  # the same keys: per-expert stays per-expert, fused fused
    assert after["model.embed_tokens.weight"] == before["model.embed_tokens.weight"]
    assert after["model.norm.weight"] == before["model.norm.weight"]
    index = CheckpointIndex(source, AutoModelForCausalLM.from_pretrained(source))
    touched = {p.key for p in index.parts(GATE_UP)}
    assert touched and all(after[k] != before[k] for k in touched)
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            assert (out / name).read_bytes() == (source / name).read_bytes()


def test_parts_tile_the_fused_tensor(tmp_path) -> None:
    """Mixtral's gate (w1) and up (w3) of each expert are the two row halves of its gate_up."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **TINY, **ARCHS["mixtral"])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    parts = CheckpointIndex(tmp_path, model).parts(GATE_UP)
    assert [(p.key.rsplit(".", 3)[1:3], p.expert, p.index[1]) for p in parts] == [
        ([str(e), w], e, slice(start, start + 16)) for w, start in (("w1", 0), ("w3", 16)) for e in range(4)
    ]
    full = model.state_dict()[GATE_UP]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for p in parts:
            assert torch.equal(full[p.index], handle.get_tensor(p.key))
    shutil.rmtree(tmp_path)
