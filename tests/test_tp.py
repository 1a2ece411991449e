"""Tensor-parallel BD-LoRA on gloo ranks against a single-process reference (tier 2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bdlora import BDLoraConfig, apply_bdlora, parallelize, save_adapter
from bdlora.model import adapter_parameters, bdlora_layers
from bdlora.parallel.mesh import ParallelDims, build_mesh
from tests.conftest import randomize_lora_b, tiny_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

CONFIG = dict(
    rank=8, alpha=16, nblocks=4, patterns={"q_proj": {"rank": 4, "alpha": 4}, "up_proj": {"rank": 12}}
)
STEPS = 10
LR = 1e-2


def reference_model(seed: int = 0):
    model = tiny_model("tiny-llama", seed).train()
    torch.manual_seed(seed)
    apply_bdlora(model, BDLoraConfig(**CONFIG))
    randomize_lora_b(model)
    return model


def batch(n: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (n, seq), generator=gen)
    return ids, ids.clone()


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gathered_adapter(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in bdlora_layers(model):
        for adapter in layer.lora_A:
            a, b = layer.full_factors(adapter)
            out[f"{name}.lora_A.{adapter}"], out[f"{name}.lora_B.{adapter}"] = a, b
    return out


def gathered_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients, joined to unsharded shape by each layer's sharding (every TP rank calls it)."""
    out = {}
    for name, layer in bdlora_layers(model):
        for adapter in layer.lora_A:
            grad_a, grad_b = layer.lora_A[adapter].grad, layer.lora_B[adapter].grad
            if layer.tp_style is not None:
                grad_a, grad_b = layer.tp_style.gather_pair(grad_a, grad_b)
            out[f"{name}.lora_A.{adapter}"], out[f"{name}.lora_B.{adapter}"] = grad_a, grad_b
    return out


def train_steps(model, ids, labels, dp_group=None, steps: int = STEPS) -> list[float]:
    """AdamW steps; under DP, ``parallelize``'s hook has averaged the gradients by backward's end."""
    opt = torch.optim.AdamW(adapter_parameters(model), lr=LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dp_group is not None:
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dp_group)
            loss /= dist.get_world_size(dp_group)
        losses.append(loss.item())
    return losses


def sharded_run(tp: int, out_dir: str) -> dict:
    """On every rank: shard, compare logits/grads, train ten steps, save the gathered adapter."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=tp))
    dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(0)
    model = parallelize(reference_model(), mesh)
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    result = {"logits": out.logits.detach(), "grads": gathered_grads(model)}
    model.zero_grad(set_to_none=True)
    local = slice(dp_rank * len(ids) // dp_size, (dp_rank + 1) * len(ids) // dp_size)
    dp_group = mesh.get_group("dp") if dp_size > 1 else None
    result["losses"] = train_steps(model, ids[local], labels[local], dp_group)
    result["adapter"] = gathered_adapter(model)
    model.eval()
    with torch.no_grad():
        result["final_logits"] = model(input_ids=ids).logits
    save_adapter(model, out_dir)
    return result


@pytest.fixture(scope="module")
def reference():
    model = reference_model()
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    losses = train_steps(model, ids, labels)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"logits": out.logits.detach(), "grads": grads, "losses": losses, "adapter": adapter}


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4", "dp2xtp2"])
def test_sharded_training_matches_single_process(reference, tmp_path, world, tp):
    from peft import PeftModel

    results = run_distributed(sharded_run, world, tp, str(tmp_path))
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
        assert res["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(
                res["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=f"rank {rank} {name}"
            )
        assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
        for name, value in reference["adapter"].items():
            torch.testing.assert_close(res["adapter"][name], value, atol=1e-5, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama"), str(tmp_path)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=batch()[0]).logits
    torch.testing.assert_close(peft_logits, results[0]["final_logits"], atol=1e-5, rtol=1e-5)


def reference_variant(variant: str):
    """tiny-qwen2 (q/k/v biases, 2 KV heads) with BD-LoRA, or tiny-llama with dense LoRA for S-LoRA."""
    name, nblocks = ("tiny-qwen2", 2) if variant == "qwen2" else ("tiny-llama", 1)
    model = tiny_model(name).train()
    torch.manual_seed(0)
    apply_bdlora(model, BDLoraConfig(rank=8, alpha=16, nblocks=nblocks))
    randomize_lora_b(model)
    return model


def variant_run(variant: str) -> dict:
    model = reference_variant(variant)
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=dist.get_world_size()))
    parallelize(model, mesh, sharding="slora" if variant == "slora" else "bdlora")
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return {"logits": out.logits.detach(), "grads": gathered_grads(model)}


@pytest.mark.parametrize("variant", ["qwen2", "slora"])
def test_tp2_variant_matches_single_process(variant):
    """Column biases shard with their rows; S-LoRA's dense sharding computes plain LoRA exactly."""
    model = reference_variant(variant)
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    for res in run_distributed(variant_run, 2, variant):
        torch.testing.assert_close(res["logits"], out.logits.detach(), atol=1e-5, rtol=1e-5)
        expected = adapter_grads(model)
        assert res["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(res["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
