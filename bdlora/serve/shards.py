"""Which part of a PEFT BD-LoRA adapter a tensor-parallel rank serves.

PEFT stores a block-diagonal factor packed: ``B`` of a column layer as ``(d_out, r/N)``, ``A`` of a
row layer as ``(r, d_in/N)``, block ``j`` being ``packed.chunk(N, 0)[j]``. With ``N = k * n``
blocks over ``n`` shards, shard ``i`` holds blocks ``i*k .. i*k + k - 1``: the rows of the packed
factor that line up with its share of the base weight. Each function below returns the shard's
factors as dense matrices, ready for an ordinary LoRA kernel:

| layer  | A on shard i                          | B on shard i                           |
|--------|---------------------------------------|----------------------------------------|
| column | ``A.chunk(n, 0)[i]``: ``(r/n, d_in)`` | its k blocks, dense: ``(d_out/n, r/n)`` |
| row    | its k blocks, dense: ``(r/n, d_in/n)`` | ``B.chunk(n, 1)[i]``: ``(d_out, r/n)``  |

No shard needs anything from another one, so serving adds no collective.
"""

from __future__ import annotations

import torch


class BlockLayoutError(ValueError):
    """An adapter's factors do not fit the layer or the TP degree they are served at."""


def packed_nblocks(module: str, packed_dim: int, full_dim: int) -> int:
    """``N`` from a packed factor's width: ``full_dim / packed_dim``; 1 for a dense factor."""
    if packed_dim <= 0 or full_dim % packed_dim:
        raise BlockLayoutError(
            f"{module}: a LoRA factor of width {packed_dim} neither matches the layer's {full_dim} "
            "nor divides it into whole blocks"
        )
    return full_dim // packed_dim


def check_shards(module: str, nblocks: int, nshards: int) -> int:
    """Blocks per shard, ``k = N / n``; a BD-LoRA adapter serves only where ``n`` divides ``N``."""
    if nblocks % nshards:
        raise BlockLayoutError(
            f"{module}: BD-LoRA adapter with nblocks={nblocks} cannot be served at tensor-parallel "
            f"degree {nshards}: nblocks must be a multiple of the TP degree (serve it at a TP degree "
            f"that divides {nblocks}, or train it with nblocks a multiple of {nshards})"
        )
    return nblocks // nshards


def _dense_blocks(packed: torch.Tensor, nblocks: int, shard: int, nshards: int) -> torch.Tensor:
    """Shard ``shard``'s k consecutive blocks of a packed factor, as one dense block-diagonal."""
    blocks = packed.chunk(nblocks, 0)
    k = nblocks // nshards
    return torch.block_diag(*blocks[shard * k : (shard + 1) * k])


def column_shard(
    a: torch.Tensor, b_packed: torch.Tensor, nblocks: int, shard: int, nshards: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A column layer's factors on ``shard``: A ``(r, d_in)`` -> ``(r/n, d_in)``; packed B
    ``(d_out, r/N)`` -> dense ``(d_out/n, r/n)``."""
    a_shard = a.chunk(nshards, 0)[shard]
    return a_shard, _dense_blocks(b_packed, nblocks, shard, nshards)


def row_shard(
    a_packed: torch.Tensor, b: torch.Tensor, nblocks: int, shard: int, nshards: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row layer's factors on ``shard``: packed A ``(r, d_in/N)`` -> dense ``(r/n, d_in/n)``;
    B ``(d_out, r)`` -> ``(d_out, r/n)``."""
    b_shard = b.chunk(nshards, 1)[shard]
    return _dense_blocks(a_packed, nblocks, shard, nshards), b_shard


def local_rank_dim(max_rank: int, nshards: int) -> int:
    """Rank columns a shard's buffers need for any adapter of rank <= ``max_rank``."""
    return -(-max_rank // nshards)
