"""Communication accounting: the base issues Megatron's f/g only; BD-LoRA adds nothing (tier 2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bdlora import BDLoraConfig, apply_bdlora
from bdlora.model import adapters_of
from bdlora.parallel import ParallelDims, build_mesh, parallelize
from bdlora.parallel.accounting import CommCounter, slora_extra_bytes
from bdlora.parallel.parallelize import tp_of
from tests.conftest import tiny_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

SEQ, BATCH = 16, 2


def one_step(mode: str) -> dict:
    """Shard tiny-llama ('base': no adapter), run one training step under the counter."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=dist.get_world_size()))
    model = tiny_model("tiny-llama").train()
    parallelize(model, mesh, sharding="slora" if mode == "slora" else "bdlora")
    tp = tp_of(model)
    if mode != "base":
        apply_bdlora(model, BDLoraConfig(rank=8, alpha=16, nblocks=tp.size))
    # the same backward graph in every mode: gradients reach the first block's input
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with CommCounter({"tp": dist.group.WORLD}) as comm:
        loss = model(input_ids=ids, labels=ids).loss
        forward = comm.summary().get("tp", {"count": 0, "ops": {}})
        loss.backward()
    total = comm.summary()["tp"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    gloo_events = sum(1 for e in prof.events() if e.name.startswith("gloo:"))
    plan = adapters_of(model)["default"].plan if mode != "base" else None
    expected = slora_extra_bytes(plan, BATCH * SEQ, tp.size) if mode == "slora" else None
    return {
        "forward": forward,
        "total": total,
        "gloo_events": gloo_events,
        "expected": expected,
        "layers": model.config.num_hidden_layers,
    }


def all_modes() -> dict:
    return {mode: one_step(mode) for mode in ("base", "bdlora", "slora")}


def step_stats(world: int) -> dict:
    return run_distributed(all_modes, world)[0]


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_bdlora_adds_no_collectives(world):
    stats = step_stats(world)
    base, bd, slora = stats["base"], stats["bdlora"], stats["slora"]
    layers = base["layers"]
    # Megatron f/g: one all-reduce forward per attention and per MLP block, at most as many backward
    assert base["forward"]["ops"] == {"all_reduce": 2 * layers}
    assert base["total"]["ops"] == {"all_reduce": 4 * layers}
    # the profiler sees the same collectives the counter does
    assert base["gloo_events"] == base["total"]["count"]
    # BD-LoRA: zero added collectives and zero added bytes in the TP group
    assert bd["total"]["count"] == base["total"]["count"]
    assert bd["total"]["bytes"] == base["total"]["bytes"]
    assert bd["gloo_events"] == bd["total"]["count"]
    # S-LoRA adds exactly what its formula predicts
    extra = slora["expected"]
    assert slora["total"]["count"] - base["total"]["count"] == extra["count"]
    assert slora["total"]["bytes"] - base["total"]["bytes"] == extra["bytes"]
    assert slora["total"]["wire_bytes"] - base["total"]["wire_bytes"] == pytest.approx(extra["wire_bytes"])
    fwd_extra = slora["forward"]["wire_bytes"] - base["forward"]["wire_bytes"]
    assert fwd_extra == pytest.approx(extra["forward_wire_bytes"])
    rank, t, tokens = 8, world, BATCH * SEQ
    per_attention_block = 5 * (t - 1) * rank * tokens / t * 4  # BDLORA.md, in fp32 bytes
    per_mlp_block = 4 * (t - 1) * rank * tokens / t * 4  # gate, up all-gather + down all-reduce
    assert fwd_extra == pytest.approx(layers * (per_attention_block + per_mlp_block))
