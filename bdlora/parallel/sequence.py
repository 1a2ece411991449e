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
from bdlora.parallel.placement import activation_argument
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


def apply_sequence_parallel_(model: nn.Module, tp: TPGroup) -> SequenceParallel:
    """Split the sequence at the first decoder layer's input and gather it again at the final norm;
    the blocks' boundaries (``placement.BlockBoundary``) gather and scatter around each block."""
    first, norm = decoder_parts(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, VocabParallelEmbedding) or not isinstance(head, VocabParallelLMHead):
        raise BDLoraConfigError("sequence_parallel=True needs vocab_parallel=True")
    sequence = SequenceParallel(tp, embedding)

    position, arg_name = activation_argument(first, "the first decoder layer")

    def enter(module, args, kwargs):
        if len(args) > position:
            hidden = sequence.enter(args[position], module.training)
            return (*args[:position], hidden, *args[position + 1 :]), kwargs
        return args, {**kwargs, arg_name: sequence.enter(kwargs[arg_name], module.training)}

    first.register_forward_pre_hook(enter, with_kwargs=True)
    norm.register_forward_hook(lambda module, args, output: sequence.exit(output))
    head.sequence = sequence
    return sequence
