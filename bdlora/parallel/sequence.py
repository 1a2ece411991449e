"""Sequence parallelism: between the TP blocks, activations are split along the sequence.

The residual stream, the RMSNorms and the final norm run on ``(B, T/t, D)``; each attention or
MLP block gathers its input and scatters its output (Megatron's sequence parallelism):

=========================  ===================================  ================================
where                      forward                              backward
=========================  ===================================  ================================
entry (first decoder       reduce-scatter of the vocabulary-    all-gather
layer's input)             parallel embedding's partial sum
f (block input)            all-gather along the sequence        reduce-scatter
g (row layer output)       reduce-scatter along the sequence    all-gather
exit (final norm output)   all-gather along the sequence        reduce-scatter (sums the LM
                                                                head's partial gradients)
=========================  ===================================  ================================

An all-gather and a reduce-scatter move the bytes of one all-reduce, so the collectives cost what
they did without sequence parallelism; the adapters still add none. A forward whose length ``T``
is not divisible by ``t`` (a generation step, say) runs the all-reduce layout instead, with the
same results; in training mode that is an error, since the memory saving would silently vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.parallel.comm import TPGroup, gather_seq, reduce_from_tp, reduce_scatter_seq, scatter_seq
from bdlora.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead


@dataclass
class SequenceParallel:
    """Whether the forward pass running now splits the sequence (decided at the first layer)."""

    tp: TPGroup
    embedding: VocabParallelEmbedding
    active: bool = False

    def enter(self, hidden: torch.Tensor, training: bool) -> torch.Tensor:
        """The first decoder layer's input: ``(B, T/t, D)`` when active, else ``(B, T, D)``."""
        length = hidden.shape[1]
        if length % self.tp.size and training:
            raise BDLoraConfigError(
                f"sequence_parallel=True: sequence length {length} is not divisible by the TP degree "
                f"{self.tp.size}; pad or pack sequences to a multiple of {self.tp.size}"
            )
        self.active = length % self.tp.size == 0
        partial = self.embedding.is_partial(hidden)
        if self.active:
            return reduce_scatter_seq(hidden, self.tp) if partial else scatter_seq(hidden, self.tp)
        return reduce_from_tp(hidden, self.tp) if partial else hidden

    def exit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm's output, whole again for the LM head."""
        return gather_seq(hidden, self.tp) if self.active else hidden


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The first decoder layer and the final norm of a transformers causal LM."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(norm, nn.Module):
        raise BDLoraConfigError(
            f"sequence_parallel=True needs a decoder with `layers` (a ModuleList) and a final `norm`, "
            f"as Llama, Mistral and Qwen2 have; {type(model).__name__} has neither"
        )
    return layers[0], norm


def _hidden_arg(block: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """A block module's activation: its first positional argument, or ``hidden_states=``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise BDLoraConfigError(
        f"sequence_parallel=True: module {block!r} was called without its activation as the first "
        f"argument or as hidden_states=, so bdlora cannot gather it along the sequence"
    )


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _split_block(module: nn.Module, name: str, sequence: SequenceParallel) -> None:
    """f and g of one block at the module's boundary: the block's own code (attention reshapes by
    its input's length) must see the whole sequence."""

    def gather_input(mod, args, kwargs):
        if not sequence.active:
            return None
        hidden = gather_seq(_hidden_arg(name, args, kwargs), sequence.tp)  # (B, T, D)
        return _with_hidden(args, kwargs, hidden)

    def scatter_output(mod, args, kwargs, output):
        if not sequence.active:
            return None
        if isinstance(output, tuple):  # attention: (output, weights)
            return (reduce_scatter_seq(output[0], sequence.tp), *output[1:])
        return reduce_scatter_seq(output, sequence.tp)  # (B, T/t, D)

    module.register_forward_pre_hook(gather_input, with_kwargs=True)
    module.register_forward_hook(scatter_output, with_kwargs=True)


def apply_sequence_parallel_(model: nn.Module, tp: TPGroup, blocks: list[str]) -> SequenceParallel:
    """Split the sequence at the first decoder layer's input, gather it around each block (the
    modules named in ``blocks``), and gather it again at the final norm."""
    first, norm = decoder_parts(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, VocabParallelEmbedding) or not isinstance(head, VocabParallelLMHead):
        raise BDLoraConfigError("sequence_parallel=True needs vocab_parallel=True")
    sequence = SequenceParallel(tp, embedding)

    def enter(module, args, kwargs):
        if args:
            return (sequence.enter(args[0], module.training), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": sequence.enter(kwargs["hidden_states"], module.training)}

    first.register_forward_pre_hook(enter, with_kwargs=True)
    for name in blocks:
        _split_block(model.get_submodule(name), name, sequence)
    norm.register_forward_hook(lambda module, args, output: sequence.exit(output))
    head.sequence = sequence
    return sequence
