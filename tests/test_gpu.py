"""Tier 3: CUDA runs of the BD-LoRA layer and a training step (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from bdlora import BDLoraConfig, apply_bdlora
from bdlora.layers import block_diag_matmul, expand_block_diag
from bdlora.model import adapter_parameters
from tests.conftest import randomize_lora_b, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_diag_matmul_on_cuda_matches_dense(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen)
    w = torch.randn(32, 16, generator=gen)  # 4 blocks of (8, 16)
    expected = x @ expand_block_diag(w, 4).T
    got = block_diag_matmul(x.cuda().to(dtype), w.cuda().to(dtype), 4).float().cpu()
    tol = 1e-5 if dtype is torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_training_step_on_cuda_matches_cpu():
    cpu = tiny_model("tiny-llama").train()
    torch.manual_seed(0)
    apply_bdlora(cpu, BDLoraConfig(rank=8, nblocks=2))
    randomize_lora_b(cpu)
    gpu = tiny_model("tiny-llama").train()
    torch.manual_seed(0)
    apply_bdlora(gpu, BDLoraConfig(rank=8, nblocks=2))
    randomize_lora_b(gpu)
    gpu.cuda()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_cpu = cpu(input_ids=ids, labels=ids).loss
    loss_gpu = gpu(input_ids=ids.cuda(), labels=ids.cuda()).loss
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-4)
    for p_cpu, p_gpu in zip(adapter_parameters(cpu), adapter_parameters(gpu)):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-4, rtol=1e-3)
