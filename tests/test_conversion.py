"""``CheckpointIndex`` reads what ``from_pretrained`` loads, slice by slice, from per-expert checkpoints.

Tiny random MoE models are saved by transformers itself (per-expert tensors for Mixtral, DeepSeek-V3 and the
Qwen MoEs, fused ones for gpt_oss); the model transformers loads back is the reference for every
tensor read whole or in part through the index.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

from bdlora.parallel import conversion
from bdlora.parallel.conversion import CheckpointIndex

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=64,
    num_experts_per_tok=2,
)
ARCHS = {
    "mixtral": dict(intermediate_size=16, num_local_experts=4),
    "qwen2_moe": dict(
        intermediate_size=16, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=16
    ),
    "qwen3_moe": dict(intermediate_size=16, moe_intermediate_size=16, num_experts=4),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4),
    "deepseek_v3": dict(  # layer 0 dense, layer 1 MoE; the qwen2_moe mapping by alias
        intermediate_size=32,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}
I = 16  # noqa: E741  (the experts' intermediate size: gate_up_proj is (E, 2I, H))
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"  # (E, 2I, H) = (4, 32, 32)
DOWN = "model.layers.1.mlp.experts.down_proj"  # (E, H, I) = (4, 32, 16)


def save_tiny(model_type: str, path: Path, **overrides) -> nn.Module:
    """A random tiny ``model_type`` saved to ``path``, and the model transformers loads back from it."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **ARCHS[model_type], **overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def saved(request, tmp_path_factory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp(request.param)
    return path, save_tiny(request.param, path)


def read(index: CheckpointIndex, key: str, item=...) -> torch.Tensor:
    with index.open(key) as source:
        return source[item]


def test_full_reads_equal_from_pretrained(saved) -> None:
    path, model = saved
    index = CheckpointIndex(path, model)
    state = model.state_dict()
    assert set(index.keys()) == set(state)
    for key, tensor in state.items():
        assert index.shape(key) == list(tensor.shape), key
        assert torch.equal(read(index, key), tensor), key


def test_per_expert_checkpoints_are_fused(saved) -> None:
    path, model = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())  # noqa: SIM118
    fused_in_file = GATE_UP in stored
    assert fused_in_file == (model.config.model_type == "gpt_oss")  # gpt_oss passes through
    index = CheckpointIndex(path, model)
    assert (GATE_UP in index) and (DOWN in index)


SLICES = [
    (slice(1, 3),),  # an expert range
    (slice(None), slice(I - 3, I + 5)),  # rows spanning the gate/up boundary
    (slice(None), slice(2, 7)),  # gate rows only
    (slice(None), slice(I + 1, 2 * I)),  # up rows only
    (slice(None), slice(None), slice(5, 20)),  # columns
    (slice(2, 4), slice(I - 1, I + 1), slice(0, 8)),
    (slice(3, 3),),  # no expert
    (slice(None), slice(I, I)),  # no row
    (slice(1, 2), ...),
    slice(0, 2),
]


@pytest.mark.parametrize("item", SLICES, ids=str)
def test_partial_reads_equal_slices(saved, item) -> None:
    path, model = saved
    index = CheckpointIndex(path, model)
    for key in (GATE_UP, DOWN):
        full = model.state_dict()[key]
        part = read(index, key, item)
        assert part.shape == full[item].shape and torch.equal(part, full[item]), key


def test_reads_only_the_requested_experts_and_rows(tmp_path, monkeypatch) -> None:
    model = save_tiny("qwen3_moe", tmp_path)
    index = CheckpointIndex(tmp_path, model)
    reads: list[tuple[str, tuple]] = []
    real = conversion.safe_open

    class Spy:
        def __init__(self, handle) -> None:
            self.handle = handle

        def get_slice(self, key: str):
            stored = self.handle.get_slice(key)

            class Slice:
                def __getitem__(self, item):
                    reads.append((key, item))
                    return stored[item]

            return Slice()

    class SpyOpen:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            return Spy(self.inner.__enter__())

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(conversion, "safe_open", SpyOpen)
    read(index, GATE_UP, (slice(1, 3), slice(I - 2, I + 3)))
    layer = "model.layers.1.mlp.experts"
    assert reads == [
        (f"{layer}.1.gate_proj.weight", (slice(14, 16), slice(0, 32))),
        (f"{layer}.2.gate_proj.weight", (slice(14, 16), slice(0, 32))),
        (f"{layer}.1.up_proj.weight", (slice(0, 3), slice(0, 32))),
        (f"{layer}.2.up_proj.weight", (slice(0, 3), slice(0, 32))),
    ]


def drop_tensor(path: Path, key: str) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors[key]
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("model_type", "dropped", "target", "expert"),
    [
        (
            "qwen2_moe",
            "model.layers.0.mlp.experts.2.up_proj.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
            2,
        ),
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.mlp.experts.down_proj",
            3,
        ),
    ],
)
def test_missing_expert_is_named(tmp_path, model_type, dropped, target, expert) -> None:
    model = save_tiny(model_type, tmp_path)
    drop_tensor(tmp_path, dropped)
    with pytest.raises(ValueError, match=f"expert {expert}") as info:
        CheckpointIndex(tmp_path, model)
    assert repr(target) in str(info.value) and repr(dropped) in str(info.value)


def test_unsupported_operation_is_refused(tmp_path) -> None:
    model = save_tiny("qwen3_moe", tmp_path)
    converter = WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0), Transpose(dim0=1, dim1=2)],
    )
    with pytest.raises(ValueError, match="cannot read that checkpoint layout") as info:
        CheckpointIndex(tmp_path, model, conversions=[converter])
    message = str(info.value)
    assert "qwen3_moe" in message and "Transpose" in message and "experts.down_proj'" in message


def test_tied_lm_head_is_not_provided(tmp_path) -> None:
    model = save_tiny("qwen3_moe", tmp_path, tie_word_embeddings=True)
    index = CheckpointIndex(tmp_path, model)
    assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in index.keys()
    assert set(model.state_dict()) - set(index.keys()) == {"lm_head.weight"}
    with pytest.raises(KeyError, match="lm_head.weight"), index.open("lm_head.weight"):
        pass


def test_index_rejects_bad_slices(tmp_path) -> None:
    model = save_tiny("mixtral", tmp_path)
    index = CheckpointIndex(tmp_path, model)
    with index.open(GATE_UP) as source:
        with pytest.raises(ValueError, match="step"):
            source[::2]
        with pytest.raises(IndexError):
            source[(slice(None),) * 4]
        with pytest.raises(TypeError):
            source[0]
