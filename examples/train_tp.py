"""Train a BD-LoRA adapter with your own loop on a TP x DP mesh, then save it for PEFT.

    torchrun --nproc-per-node 2 examples/train_tp.py --model path/to/hf_model --out adapter
    torchrun --nproc-per-node 4 examples/train_tp.py --model path/to/hf_model --tp 2 --out adapter
    python examples/train_tp.py --model path/to/hf_model --out adapter          # one process

``--model`` is a local Hugging Face directory with safetensors weights. Every rank loads only its
shard of each projection; the adapter adds no collective to the base model's. Afterwards:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), "adapter")``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import bdlora
from bdlora.parallel import ParallelDims, build_mesh, init_distributed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="where rank 0 writes the PEFT adapter")
    parser.add_argument("--tp", type=int, default=None, help="TP degree (default: every rank)")
    parser.add_argument("--nblocks", type=int, default=2, help="BD-LoRA blocks; a multiple of --tp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def batches(vocab: int, dp_rank: int, dp_size: int, seed: int):
    """Random token batches of 8 rows; each DP rank takes its own 8 / dp_size of them."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (8, 32), generator=gen)  # (B, T), the same on every rank
        rows = ids.chunk(dp_size)[dp_rank]  # (B / dp, T)
        yield rows, rows


def main() -> None:
    args = parse_args()
    world = init_distributed()  # torchrun's environment, or a world of one
    mesh = build_mesh(ParallelDims(world, tp=args.tp or world))
    # nblocks = k * tp: the same adapter trains (and serves) at any TP degree dividing nblocks
    config = bdlora.BDLoraConfig(rank=8, alpha=16, nblocks=args.nblocks, patterns={"down_proj": {"rank": 16}})
    # builds on the meta device, parallelizes (TP, then DP gradient averaging), reads local slices
    model = bdlora.from_pretrained(args.model, config, mesh=mesh, seed=args.seed).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = batches(model.config.vocab_size, mesh["dp"].get_local_rank(), mesh["dp"].size(), args.seed)
    for step in range(args.steps):
        ids, labels = next(data)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()  # DP-averaged in backward; TP needs nothing beyond the base's own f and g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    # TP-sharded: every rank takes part in the gather and global rank 0 writes the files;
    # data parallel only: no collective is involved, so rank 0 alone saves
    if mesh["tp"].size() > 1 or dist.get_rank() == 0:
        bdlora.save_adapter(model, args.out)
    if dist.get_rank() == 0:
        print(f"adapter written to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
