"""The single-process demo: a tiny Llama, BD-LoRA from a pattern config, a short training run."""

from __future__ import annotations

import time

import torch

from bdlora import BDLoraConfig, apply_bdlora, save_adapter
from bdlora.data import embedded_pairs
from bdlora.model import adapter_parameters, adapters_of
from bdlora.presets import build_model
from bdlora.train.data import byte_batches

DEMO_CONFIG = BDLoraConfig(
    rank=8,
    alpha=16,
    nblocks=2,
    patterns={
        "k_proj": None,  # leave keys alone (first match wins: listed before layers.0)
        r"layers\.0\..*": {"rank": 16},  # more capacity in the first layer
        "down_proj": {"init": "base_stats"},
    },
)


def run_demo(steps: int = 40, out_dir: str | None = None, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = build_model("tiny-llama", seed=seed).train()
    apply_bdlora(model, DEMO_CONFIG)
    print(adapters_of(model)["default"].plan.format(tp=2))
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batches = byte_batches(embedded_pairs(2000, seed), batch_size=16, seq_len=64, seed=seed)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        x, y = next(batches)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    print(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps ({elapsed:.1f}s), "
        f"{sum(p.numel() for p in params):,} trainable params"
    )
    if out_dir:
        save_adapter(model, out_dir)
        print(f"adapter (PEFT BD-LoRA format) saved to {out_dir}")
    return losses
