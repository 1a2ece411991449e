"""The ``replicated`` sharding (torchtitan's, PEFT-on-TP's and vLLM's default LoRA layout) at TP 2,
TP 4 and DP 2 x TP 2 against one process (tier 2).

Column layers hold A whole and B's rows; row layers A's columns and B whole. Forward adds no
collective; the whole factors' partial gradients are summed over TP in one all-reduce per backward,
or, built for another engine's DP (``data_parallel=False``, DeepSpeed), one per factor as each
gradient is ready (tests/test_deepspeed.py trains it under ZeRO).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from bdlora import BDLoraConfig, apply_bdlora, save_adapter
from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh, no_sync, parallelize
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.styles import replicated_factors
from tests.conftest import logits, tiny_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

SEQ, BATCH, STEPS, LR = 16, 4, 10, 1e-2
CONFIG = BDLoraConfig(rank=8, alpha=16, nblocks=1)


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def build(mesh, data_parallel: bool = True) -> torch.nn.Module:
    model = tiny_model("tiny-llama").train()
    if mesh is not None:
        parallelize(model, mesh, sharding="replicated", data_parallel=data_parallel)
    torch.manual_seed(0)
    apply_bdlora(model, CONFIG)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B drawn unsharded, so every layout holds the same adapter
        for _, layer in bdlora_layers(model):
            a, b = layer.full_factors("default")
            layer.set_factors("default", a, torch.randn(b.shape, generator=generator) * 0.1)
    return model


def unsharded(model, grads: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, layer in bdlora_layers(model):
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        a, b = (a.grad, b.grad) if grads else (a.detach(), b.detach())
        out[name] = layer.tp_style.gather_pair(a, b) if layer.tp_style else (a.clone(), b.clone())
    return out


def run(tp: int, save_dir: str | None = None, data_parallel: bool = True) -> dict:
    """One counted step, then AdamW for ``STEPS`` steps; with DP, each replica its half of the batch."""
    mesh = None if tp == 1 else build_mesh(ParallelDims(dist.get_world_size(), tp=tp))
    model = build(mesh, data_parallel)
    ids = batch()
    dp = 1 if mesh is None else dist.get_world_size() // tp
    if dp > 1:
        ids = ids.chunk(dp)[mesh.get_local_rank("dp")]
    out = {"logits": logits(model, batch())}
    model.train()
    group = None if mesh is None else mesh.get_group("tp")
    with CommCounter({"tp": group}) as comm:
        loss = model(input_ids=ids, labels=ids).loss
        forward = dict(comm.summary().get("tp", {"count": 0}))
        loss.backward()
    out["forward"], out["step"] = forward, comm.summary().get("tp", {"count": 0, "bytes": 0})
    out["loss"], out["grads"] = loss.detach(), unsharded(model, grads=True)
    out["replicated_bytes"] = sum(p.numel() * p.element_size() for p in replicated_factors(model))
    out["replicated_count"] = len(replicated_factors(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        optimizer.step()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    out["factors"] = unsharded(model)
    if save_dir is not None:
        save_adapter(model, save_dir)
    return out


def accumulate(tp: int) -> dict:
    """Two micro-batches, the first under ``no_sync``: the TP sum runs once, after the second."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=tp))
    model = build(mesh)
    ids = batch()
    with CommCounter({"tp": mesh.get_group("tp")}) as comm:
        with no_sync(model):
            model(input_ids=ids[:2], labels=ids[:2]).loss.backward()
        first = comm.summary().get("tp", {"count": 0})["count"]
        model(input_ids=ids[2:], labels=ids[2:]).loss.backward()
    return {"first": first, "total": comm.summary()["tp"]["count"], "grads": unsharded(model, grads=True)}


@pytest.fixture(scope="module")
def reference() -> dict:
    return run(1)


@pytest.fixture(scope="module")
def reference_accumulated() -> dict:
    model = build(None)
    ids = batch()
    for part in (ids[:2], ids[2:]):
        model(input_ids=part, labels=part).loss.backward()
    return unsharded(model, grads=True)


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda d: f"{what}: {d}")


def close_to_reference(res: dict, reference: dict, rank: int, summed: str) -> None:
    """One rank's gradients (A's summed over TP ``summed``) and factors after the AdamW steps."""
    for name, (grad_a, grad_b) in reference["grads"].items():
        close(res["grads"][name][0], grad_a, f"rank {rank} grad A of {name} ({summed})")
        close(res["grads"][name][1], grad_b, f"rank {rank} grad B of {name}")
    for name, (a, b) in reference["factors"].items():
        close(res["factors"][name][0], a, f"rank {rank} A of {name} after {STEPS} AdamW steps")
        close(res["factors"][name][1], b, f"rank {rank} B of {name} after {STEPS} AdamW steps")


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4", "dp2xtp2"])
def test_replicated_matches_one_process(reference, tmp_path, world, tp):
    results = run_distributed(run, world, tp, str(tmp_path / "adapter"))
    for rank, res in enumerate(results):
        close(res["logits"], reference["logits"], f"rank {rank} logits")
        if world == tp:  # with DP each replica's loss is its half's
            close(res["loss"], reference["loss"], f"rank {rank} loss")
        close_to_reference(res, reference, rank, "after the TP sum")
        # no forward collective beyond the base's f/g; backward: the base's plus one summed all-reduce
        blocks = 2 * 2  # tiny-llama: 2 layers x (attention, MLP)
        assert res["forward"]["count"] == blocks, res["forward"]
        assert res["step"]["count"] == 2 * blocks + 1 - 1, res["step"]  # the first f has no input grad
        assert res["step"]["ops"] == {"all_reduce": res["step"]["count"]}
    assert len({r["replicated_bytes"] for r in results}) == 1


def test_replicated_step_sends_the_predicted_gradient_bytes(tmp_path):
    (res, _) = run_distributed(run, 2, 2)
    hidden_tokens_bytes = BATCH * SEQ * 64 * 4  # one f/g all-reduce: (B, T, D) fp32
    base = (2 * 2 + 2 * 2 - 1) * hidden_tokens_bytes
    assert res["step"]["bytes"] == base + res["replicated_bytes"]


def test_no_sync_defers_the_tp_sum_to_the_last_micro_batch(reference_accumulated):
    for rank, res in enumerate(run_distributed(accumulate, 2, 2)):
        blocks = 2 * 2
        assert res["first"] == 2 * blocks - 1  # the base's f and g, no gradient sum
        assert res["total"] == 2 * (2 * blocks - 1) + 1  # one sum, after the last micro-batch
        for name, (grad_a, grad_b) in reference_accumulated.items():
            close(res["grads"][name][0], grad_a, f"rank {rank} accumulated grad A of {name}")
            close(res["grads"][name][1], grad_b, f"rank {rank} accumulated grad B of {name}")


def test_summing_each_gradient_as_it_is_ready_matches_one_process(reference):
    """``data_parallel=False`` (DeepSpeed's layout): each whole factor's gradient is summed over TP
    before it is accumulated, one all-reduce per factor, the same bytes as the flat one."""
    for rank, res in enumerate(run_distributed(run, 2, 2, None, False)):
        close(res["loss"], reference["loss"], f"rank {rank} loss")
        close_to_reference(res, reference, rank, "summed in backward")
        blocks = 2 * 2
        assert res["replicated_count"] == 2 * 7  # tiny-llama: 2 layers x 7 linears, one whole factor each
        assert res["step"]["count"] == 2 * blocks - 1 + res["replicated_count"], res["step"]
        hidden_tokens_bytes = BATCH * SEQ * 64 * 4
        assert res["step"]["bytes"] == (2 * blocks - 1) * hidden_tokens_bytes + res["replicated_bytes"]


def test_the_saved_adapter_is_plain_lora_that_peft_loads(tmp_path):
    """What the TP 2 run saves (the gathered factors) is plain LoRA; PEFT's logits equal bdlora's."""
    from peft import PeftModel

    (res, _) = run_distributed(run, 2, 2, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config.get("use_bdlora") is None and config["r"] == CONFIG.rank
    peft = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path / "adapter").eval()
    expected = build(None)
    for name, layer in bdlora_layers(expected):
        layer.set_factors("default", *res["factors"][name])
    close(logits(peft, batch()), logits(expected, batch()), "PEFT logits")
