"""Lazy reads of model tensors that transformers assembles from differently named checkpoint tensors.

transformers 5 keeps each mixture-of-experts layer as fused 3-D parameters (``experts.gate_up_proj``
``(E, 2I, H)``, ``experts.down_proj`` ``(E, H, I)``), while the checkpoints ``save_pretrained`` writes
for Mixtral, Qwen2/3-MoE, DeepSeek-V3 and kin hold one 2-D tensor per expert and projection.
transformers renames and fuses them at load time by the rules of ``transformers.conversion_mapping``.
Fusing the whole tensor on every rank would defeat sharded loading, so :class:`CheckpointIndex`
follows the same rules but hands out *lazy sources*: composites of per-expert safetensors slices
whose ``source[a:b, c:d]`` reads only the experts and rows it returns.
"""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

Span = tuple[int, int]  # [start, stop) along one dim


def spans_of(index: Any, shape: Sequence[int]) -> list[Span]:
    """The ``[start, stop)`` span per dim that ``index`` selects.

    Accepts what the loader passes to a safetensors slice: ``...``, one slice, or a tuple of slices
    (fewer than the dims leave the rest whole, a trailing ``...`` too), steps of one only.
    """
    if index is Ellipsis:
        index = ()
    elif isinstance(index, slice):
        index = (index,)
    if isinstance(index, tuple) and index and index[-1] is Ellipsis:
        index = index[:-1]
    if not isinstance(index, tuple) or not all(isinstance(s, slice) for s in index):
        raise TypeError(f"a lazy checkpoint source takes slices or ..., not {index!r}")
    if len(index) > len(shape):
        raise IndexError(f"{len(index)} slices for a tensor of shape {list(shape)}")
    spans = []
    for dim, size in enumerate(shape):
        start, stop, step = (index[dim] if dim < len(index) else slice(None)).indices(size)
        if step != 1:
            raise ValueError(f"a lazy checkpoint source reads contiguous slices only, not step {step}")
        spans.append((start, max(start, stop)))
    return spans


def _with_span(spans: list[Span], dim: int, span: Span) -> list[Span]:
    return [*spans[:dim], span, *spans[dim + 1 :]]


class LazySource(ABC):
    """A model tensor read on demand, shaped like a safetensors slice: ``get_shape()`` and
    ``source[slices]``, which reads only the part it returns."""

    @abstractmethod
    def get_shape(self) -> list[int]: ...

    @abstractmethod
    def read(self, spans: list[Span]) -> torch.Tensor:
        """The sub-tensor ``spans`` (one ``[start, stop)`` per dim) selects."""

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.read(spans_of(index, self.get_shape()))


class _Files:
    """The safetensors handles of one read, each file opened once and closed with ``stack``."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack, self.handles = stack, {}

    def get(self, path: Path) -> Any:
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[path]


class Stored(LazySource):
    """One tensor as a checkpoint file stores it (e.g. one expert's ``(I, H)`` gate)."""

    def __init__(self, files: _Files, path: Path, key: str, shape: list[int]) -> None:
        self.files, self.path, self.key, self.shape = files, path, key, list(shape)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def read(self, spans: list[Span]) -> torch.Tensor:
        index = tuple(slice(a, b) for a, b in spans) if spans else ...  # ... reads a 0-dim tensor
        return self.files.get(self.path).get_slice(self.key)[index]


class Stacked(LazySource):
    """``MergeModulelist(dim=0)``: equal-shaped parts stacked into ``(E, *part_shape)``."""

    def __init__(self, parts: Sequence[LazySource]) -> None:
        shapes = {tuple(p.get_shape()) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack {len(parts)} expert tensors of shapes {sorted(shapes)}")
        self.parts = list(parts)

    def get_shape(self) -> list[int]:
        return [len(self.parts), *self.parts[0].get_shape()]

    def read(self, spans: list[Span]) -> torch.Tensor:
        (first, stop), rest = spans[0], spans[1:]
        if first == stop:  # no expert: an empty tensor of the stored dtype, reading nothing
            dtype = self.parts[0].read([(0, 0)] * len(rest)).dtype
            return torch.empty([0, *(b - a for a, b in rest)], dtype=dtype)
        return torch.stack([self.parts[e].read(rest) for e in range(first, stop)])


class Concatenated(LazySource):
    """``Concatenate(dim)``: parts joined along ``dim``, e.g. gate and up ``(E, I, H)`` into ``(E, 2I, H)``.

    A span along ``dim`` is split over the parts it covers, so rows ``[a, b)`` may read gate
    only, up only, or the end of gate and the start of up.
    """

    def __init__(self, parts: Sequence[LazySource], dim: int) -> None:
        others = {tuple(_with_span([(0, n) for n in p.get_shape()], dim, (0, 0))) for p in parts}
        if len(others) != 1:
            shapes = [p.get_shape() for p in parts]
            raise ValueError(f"cannot concatenate tensors of shapes {shapes} along dim {dim}")
        self.parts, self.dim = list(parts), dim
        sizes = [p.get_shape()[dim] for p in self.parts]
        self.starts = [0, *itertools.accumulate(sizes)]

    def get_shape(self) -> list[int]:
        shape = self.parts[0].get_shape()
        shape[self.dim] = self.starts[-1]
        return shape

    def read(self, spans: list[Span]) -> torch.Tensor:
        first, stop = spans[self.dim]
        pieces = []
        for part, start, end in zip(self.parts, self.starts, self.starts[1:]):
            lo, hi = max(first, start), min(stop, end)
            if lo < hi:
                pieces.append(part.read(_with_span(spans, self.dim, (lo - start, hi - start))))
        if not pieces:  # an empty span: read nothing, keep the dtype and the other dims
            pieces.append(self.parts[0].read(_with_span(spans, self.dim, (0, 0))))
        return torch.cat(pieces, self.dim)


def checkpoint_conversions(model: nn.Module) -> list:
    """The renamings and converters transformers applies to ``model``'s checkpoints at load time.

    Like transformers: the mapping registered for the model's class, else for its
    ``config.model_type`` (aliases resolved, e.g. qwen3_moe and deepseek_v3 use qwen2_moe's), then
    the legacy renamings every model gets. Mappings of nested sub-models (vision towers) are not
    looked up: bdlora loads causal LMs.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found = get_checkpoint_conversion_mapping(type(model).__name__)
    if found is None:
        found = get_checkpoint_conversion_mapping(model.config.model_type)
    return [*(found or []), *(get_checkpoint_conversion_mapping("legacy") or [])]


@dataclass(frozen=True)
class _Hit:
    """One source pattern of a transform matching a key."""

    renamed: str
    pattern: int  # which source pattern matched
    expert: int | None  # the number ``*`` stood for; None for a pattern without ``*``


class _Rule:
    """A transform's source patterns matched as transformers matches them.

    Each pattern is a regex searched in the key (longest pattern first when several match at one
    place), ``*`` stands for the expert index, and a pattern ending in a name character does not
    match a longer name (``weight`` is not ``weight_scale``). The matched text becomes the target
    (the pattern's own when there is one per pattern, else the first), ``\\1`` taking the pattern's
    first group.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        sources, targets = list(transform.source_patterns), list(transform.target_patterns)
        targets = [t.removeprefix("^").replace(r"\.", ".") for t in targets]
        self.targets = targets if len(targets) == len(sources) else [targets[0]] * len(sources)
        self.sources = sources
        branches = []
        for i, pattern in sorted(enumerate(sources), key=lambda item: -len(item[1])):
            body = pattern.replace("*", rf"(?P<e{i}>\d+)", 1)
            if re.search(r"[A-Za-z0-9]$", body):
                body += r"(?!\w)"
            branches.append(f"(?P<s{i}>{body})")
        self.regex = re.compile("|".join(branches))

    def match(self, key: str) -> _Hit | None:
        found = self.regex.search(key)
        if found is None:
            return None
        i = next(int(g[1:]) for g, v in found.groupdict().items() if g[0] == "s" and v is not None)
        target = self.targets[i]
        if r"\1" in target:
            target = target.replace(r"\1", found.group(self.regex.groupindex[f"s{i}"] + 1))
        expert = found.group(f"e{i}") if f"e{i}" in self.regex.groupindex else None
        renamed = key[: found.start()] + target + key[found.end() :]
        return _Hit(renamed, i, None if expert is None else int(expert))


@dataclass
class _Fused:
    """The checkpoint tensors a converted model key is built from, and the converter building it."""

    rule: _Rule
    groups: list[dict[int | None, str]] = field(default_factory=list)  # per pattern: expert -> key


@dataclass(frozen=True)
class StoredPart:
    """One checkpoint tensor of a model tensor: ``model_tensor[index]`` is the stored ``key``.

    ``index`` holds one entry per dim of the model tensor: an int where the stored tensor is one
    entry of that dim (the expert a per-expert tensor is, which its own shape lacks), else the
    ``slice(start, stop)`` (step 1) it spans, e.g. gate's or up's rows of a fused ``gate_up_proj``.
    """

    key: str
    index: tuple[int | slice, ...]

    @property
    def expert(self) -> int | None:
        """The expert this stored tensor belongs to alone (dim 0 an int), else None (all it spans)."""
        return self.index[0] if self.index and isinstance(self.index[0], int) else None


def _place(source: LazySource, index: list[int | slice], dims: list[int], out: list[StoredPart]) -> None:
    """Append the :class:`StoredPart` of every stored tensor ``source`` is composed of; ``index``
    is where ``source`` sits in the model tensor, ``dims`` the model tensor's dim of each of its own."""
    if isinstance(source, Stored):
        out.append(StoredPart(source.key, tuple(index)))
    elif isinstance(source, Stacked):  # its dim 0 is the expert: one int per part, dim dropped
        dim = dims[0]
        first = index[dim].start
        for e, part in enumerate(source.parts):
            _place(part, [*index[:dim], first + e, *index[dim + 1 :]], dims[1:], out)
    elif isinstance(source, Concatenated):  # each part a span of its dim
        dim = dims[source.dim]
        first = index[dim].start
        for part, start, stop in zip(source.parts, source.starts, source.starts[1:]):
            _place(part, [*index[:dim], slice(first + start, first + stop), *index[dim + 1 :]], dims, out)
    else:
        raise TypeError(f"cannot place the parts of {type(source).__name__}")


class CheckpointIndex:
    """The model-side tensors of a safetensors checkpoint, each readable lazily by slices.

    Keys are renamed and per-expert tensors fused as ``from_pretrained`` would (see
    :func:`checkpoint_conversions`); a checkpoint already in the model's layout (gpt_oss stores
    ``experts.gate_up_proj`` itself) or a model without a mapping passes through unchanged. Only
    the ``MergeModulelist(dim=0)`` and ``Concatenate(dim=1)`` operations are read lazily; any
    other operation on a tensor of this checkpoint is refused here, before any weight is read, as
    are gaps in the experts.
    """

    def __init__(self, model_dir: str | Path, model: nn.Module, conversions: Sequence | None = None) -> None:
        from bdlora.parallel.loading import checkpoint_name, weight_files  # loading imports this module

        self.model_dir, self.model_type = Path(model_dir), model.config.model_type
        transforms = checkpoint_conversions(model) if conversions is None else list(conversions)
        self._renamings = [_Rule(t) for t in transforms if not isinstance(t, WeightConverter)]
        self._converters = [_Rule(t) for t in transforms if isinstance(t, WeightConverter)]
        # transformers' names of the model's tensors (bdlora's wrappers renamed back)
        self._model_keys = {checkpoint_name(model, k) for k in model.state_dict()}
        self._prefix = getattr(model, "base_model_prefix", "") or ""
        self._where: dict[str, Path] = {}  # checkpoint key -> file
        self._shapes: dict[str, list[int]] = {}  # checkpoint key -> stored shape
        for path in weight_files(self.model_dir):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open has no iter)
                    self._where[key] = path
                    self._shapes[key] = handle.get_slice(key).get_shape()
        self._plain: dict[str, str] = {}  # model key -> checkpoint key
        self._fused: dict[str, _Fused] = {}
        for key in self._where:
            self._add(key)
        self._experts = self._expert_counts()
        self._fused_shapes = {target: self._check_fused(target) for target in self._fused}

    # -- queries -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The model keys this checkpoint provides (a tied ``lm_head.weight`` it lacks is absent)."""
        return sorted([*self._plain, *self._fused])

    def __contains__(self, key: str) -> bool:
        return key in self._plain or key in self._fused

    def shape(self, key: str) -> list[int]:
        """The full shape of model tensor ``key``, from the file headers alone."""
        if key in self._fused:
            return list(self._fused_shapes[key])
        return list(self._shapes[self._checkpoint_key(key)])

    def parts(self, key: str) -> list[StoredPart]:
        """The checkpoint tensors model tensor ``key`` is made of, and where each one sits in it.

        Each :class:`StoredPart` names a stored tensor and the index (one int or ``[start, stop)``
        slice per dim of the model tensor) with ``model_tensor[part.index]`` equal to it, in the
        stored shape: a plain key gives one part, the whole tensor; Mixtral's expert ``e`` gate
        ``(I, H)`` in ``experts.gate_up_proj`` ``(E, 2I, H)`` gives ``(e, slice(0, I),
        slice(0, H))``, its up ``(e, slice(I, 2I), slice(0, H))``. Parts are listed in storage
        order (pattern by pattern, expert by expert) and tile the model tensor. From the file
        headers alone: nothing is read.
        """
        if key not in self._fused:
            stored = self._checkpoint_key(key)
            return [StoredPart(stored, tuple(slice(0, n) for n in self._shapes[stored]))]
        source = self._compose(key, _Files(ExitStack()))  # builds lazy sources; opens no file
        shape = source.get_shape()
        found: list[StoredPart] = []
        _place(source, [slice(0, n) for n in shape], list(range(len(shape))), found)
        return found

    @contextmanager
    def open(self, key: str) -> Iterator[Any]:
        """A lazy source for model tensor ``key``, valid inside the ``with`` block.

        A plain key gives the safetensors slice itself; a fused one a :class:`LazySource` over its
        per-expert slices. Each file is opened once per ``open`` and unmapped on leaving, so the
        pages a read touched do not stay resident.
        """
        with ExitStack() as stack:
            files = _Files(stack)
            if key in self._fused:
                yield self._compose(key, files)
            else:
                stored = self._checkpoint_key(key)
                yield files.get(self._where[stored]).get_slice(stored)

    # -- building ------------------------------------------------------------------------------
    def _checkpoint_key(self, key: str) -> str:
        if key not in self._plain:
            raise KeyError(f"{self.model_dir}: the checkpoint holds no tensor for {key!r}")
        return self._plain[key]

    def _model_key(self, renamed: str) -> str:
        """``renamed`` with the base-model prefix added or dropped where only that matches the model."""
        if renamed in self._model_keys or not self._prefix:
            return renamed
        stripped = renamed.removeprefix(f"{self._prefix}.")
        if stripped != renamed and stripped in self._model_keys:
            return stripped
        prefixed = f"{self._prefix}.{renamed}"
        return prefixed if prefixed in self._model_keys else renamed

    def _add(self, key: str) -> None:
        """File checkpoint tensor ``key`` under the model key it becomes: all renamings, then at
        most one converter; a key the model has as stored stays as stored."""
        renamed = key
        for rule in self._renamings:
            hit = rule.match(renamed)
            renamed = hit.renamed if hit else renamed
        rule, hit = self._converter_for(renamed)
        target = self._model_key(hit.renamed if hit else renamed)
        if target not in self._model_keys and key in self._model_keys:
            rule, hit, target = None, None, key
        if rule is None:
            self._add_plain(target, key)
        else:
            self._add_fused(target, key, rule, hit)

    def _converter_for(self, key: str) -> tuple[_Rule | None, _Hit | None]:
        """The first converter matching ``key`` (transformers applies one at most), and its match."""
        for rule in self._converters:
            if hit := rule.match(key):
                return rule, hit
        return None, None

    def _add_plain(self, target: str, key: str) -> None:
        if target in self._plain or target in self._fused:
            raise ValueError(
                f"{self.model_dir}: checkpoint tensors {self._plain.get(target, '(per-expert)')!r} "
                f"and {key!r} both give {target!r} ({self.model_type})"
            )
        self._plain[target] = key

    def _add_fused(self, target: str, key: str, rule: _Rule, hit: _Hit) -> None:
        if target in self._plain:
            raise ValueError(f"{self.model_dir}: the checkpoint holds {target!r} both fused and per expert")
        if target not in self._fused:
            self._check_operations(target, rule)
            self._fused[target] = _Fused(rule, [{} for _ in rule.sources])
        group = self._fused[target].groups[hit.pattern]
        if hit.expert in group:
            raise ValueError(f"{self.model_dir}: {group[hit.expert]!r} and {key!r} both give one expert")
        group[hit.expert] = key

    def _check_operations(self, target: str, rule: _Rule) -> None:
        for op in rule.transform.operations:
            dim = getattr(op, "dim", None)
            if not (
                (isinstance(op, MergeModulelist) and dim == 0) or (isinstance(op, Concatenate) and dim == 1)
            ):
                raise ValueError(
                    f"{self.model_dir}: transformers builds {target!r} ({self.model_type}) from "
                    f"{rule.sources} with {op!r}; bdlora cannot read that checkpoint layout (it reads "
                    f"MergeModulelist(dim=0) and Concatenate(dim=1) conversions only)"
                )

    def _expert_counts(self) -> dict[int, int]:
        """Experts per converter (by ``id``): one more than the highest index any layer has."""
        counts: dict[int, int] = {}
        for fused in self._fused.values():
            top = max((e for g in fused.groups for e in g if e is not None), default=-1)
            counts[id(fused.rule)] = max(counts.get(id(fused.rule), 0), top + 1)
        return counts

    def _check_fused(self, target: str) -> list[int]:
        """The shape of fused ``target``, once every expert is known present: 0..E-1, E the most
        experts any layer of the same converter has (a layer short of its last expert shows)."""
        fused = self._fused[target]
        count = self._experts[id(fused.rule)]
        for pattern, group in zip(fused.rule.sources, fused.groups):
            wanted = set(range(count)) if "*" in pattern else {None}
            if missing := wanted - set(group):
                raise ValueError(
                    f"{self.model_dir}: cannot build {target!r} ({self.model_type}): the checkpoint "
                    f"lacks {_missing(pattern, group, missing)}"
                )
        try:
            return self._compose(target, _Files(ExitStack())).get_shape()
        except ValueError as err:
            raise ValueError(f"{self.model_dir}: cannot build {target!r} ({self.model_type}): {err}") from err

    def _compose(self, target: str, files: _Files) -> LazySource:
        """The converter's operations applied to lazy per-expert sources instead of tensors."""
        fused = self._fused[target]
        values: list[list[LazySource]] = [
            [Stored(files, self._where[k], k, self._shapes[k]) for _, k in sorted(g.items(), key=_by_expert)]
            for g in fused.groups
        ]
        for op in fused.rule.transform.operations:
            if isinstance(op, MergeModulelist):  # per pattern: E x (I, H) -> (E, I, H)
                values = [[Stacked(parts)] for parts in values]
            else:  # Concatenate, in pattern order: (E, I, H) + (E, I, H) -> (E, 2I, H)
                values = [[Concatenated([s for parts in values for s in parts], op.dim)]]
        if len(values) != 1 or len(values[0]) != 1:
            raise ValueError(f"{fused.rule.transform!r} does not give a single tensor")
        return values[0][0]


def _by_expert(item: tuple[int | None, str]) -> int:
    return item[0] or 0


def _missing(pattern: str, group: dict[int | None, str], missing: set[int | None]) -> str:
    """What the checkpoint lacks: the first missing expert of ``pattern`` and the key it would have."""
    if None in missing:
        return f"a tensor matching {pattern!r}"
    expert = min(e for e in missing if e is not None)
    present = sorted(e for e in group if e is not None)
    return f"expert {expert} of {pattern!r}, i.e. {_expert_key(group, expert)!r} (experts present: {present})"


def _expert_key(group: dict[int | None, str], expert: int) -> str:
    """The checkpoint key expert ``expert`` would have, from a present expert's: its index swapped
    in at the last dotted component equal to it (renamings leave the numbers of a key alone)."""
    if not group:
        return f"<expert {expert}>"
    present, example = next(iter(group.items()))
    parts = example.split(".")
    at = max((i for i, p in enumerate(parts) if p == str(present)), default=None)
    if at is None:
        return f"<expert {expert}, like {example}>"
    return ".".join([*parts[:at], str(expert), *parts[at + 1 :]])
