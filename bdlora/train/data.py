"""The trainer's data pipeline: examples -> tokens -> packed blocks -> DP-sharded micro-batches.

Sources (``DataConfig.source``): ``"embedded"`` (generated instruction pairs, no download), a local
``.jsonl`` or ``.txt`` file or a directory of them, or, with ``hf_format`` set, local files read by
``datasets.load_dataset(hf_format, data_files=source)``. A record is plain text (``text_field``, all
tokens trained) or a pair (``prompt_field`` + ``response_field``, or ``instruction`` + ``output``),
rendered with :func:`bdlora.data.format_pair` and trained on the response only.

Shapes (N packed blocks, B = micro_batch_size, T = seq_len, D = dp_size):

=================  ==============================================================================
``pack_examples``  ``input_ids``, ``labels``: (N, T) int64; prompt and padding labels are -100,
                   elsewhere labels == input_ids (the HF model shifts them itself)
``PackedLoader``   endless (B, T) batches; step s takes B * D blocks of the epoch's shuffled order
                   and DP rank r the r-th B of them: the ranks of one TP group (same r) get the
                   same batch, different DP ranks disjoint ones
``EvalLoader``     finite (<= B, T) batches over floor(N / D) eval blocks per DP rank, in order
=================  ==============================================================================

No collectives: every rank reads and packs the whole dataset, and the shared seed keeps them in step.
Packed examples are separated by eos but attend across it (plain packing, no block-diagonal mask).
"""

from __future__ import annotations

import glob
import json
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bdlora.data import embedded_pairs, format_pair

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IGNORE_INDEX = -100  # the label HF causal-LM losses skip
HF_FORMATS = ("json", "csv", "parquet", "text", "arrow")
NATIVE_SUFFIXES = (".jsonl", ".txt")
PAIR_ALIASES = (("instruction", "output"),)  # Alpaca-style records load without configuring fields

Example = tuple[str, str]  # (prompt, completion); plain text has prompt "" and is trained on whole


class DataError(ValueError):
    """Data that cannot be trained on; the message names the source, the value and what is valid."""


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded", a .jsonl/.txt file or directory, or files for hf_format
    num_examples: int = 4000  # "embedded" only: how many pairs to generate
    seq_len: int | None = 128  # None: the model's max_position_embeddings, at most DEFAULT_SEQ_LEN
    micro_batch_size: int = 8  # per DP rank
    eval_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    hf_format: str | None = None  # a datasets builder that reads source: one of HF_FORMATS

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "num_examples"):
            minimum = 2 if name == "seq_len" else 1  # a loss needs an input and its next token
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                raise DataError(f"data.{name} must be >= {minimum}, got {getattr(self, name)}")
        _check_fraction(self.eval_fraction)
        if self.hf_format is not None and self.hf_format not in HF_FORMATS:
            raise DataError(f"data.hf_format {self.hf_format!r} is unknown; valid: {', '.join(HF_FORMATS)}")


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(
            f"data.eval_fraction must lie in [0, 1), got {eval_fraction}; use 0 for no eval split"
        )


# --- tokenisers ---------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """All the pipeline asks of a tokeniser. ``encode`` must add no special tokens of its own."""

    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); byte 0, which real text does not contain, is eos."""

    vocab_size = 256
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != self.eos_token_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind :class:`Tokenizer`.

    It adds no special tokens: packing places eos itself, and a BOS before every prompt and every
    response would cut each example in two.
    """

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer {tokenizer.name_or_path!r} has no eos token, which packing needs between "
                "examples; use a tokenizer that defines eos_token"
            )
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def build_tokenizer(name_or_path: str | None, gguf_file: str | None = None) -> Tokenizer:
    """``None`` or ``"bytes"``: :class:`ByteTokenizer`; else ``AutoTokenizer.from_pretrained``."""
    if name_or_path in (None, "bytes"):
        if gguf_file is not None:
            raise DataError(f"gguf_file={gguf_file!r} needs a tokenizer name or path, not bytes")
        return ByteTokenizer()
    from transformers import AutoTokenizer  # noqa: PLC0415

    kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    return HFTokenizer(AutoTokenizer.from_pretrained(name_or_path, **kwargs))


# --- loading examples ---------------------------------------------------------------------------


def load_examples(cfg: DataConfig) -> list[Example]:
    """Every example of ``cfg.source``, in file order; raises on the first bad record."""
    if cfg.source == "embedded":
        examples = [format_pair(p, r) for p, r in embedded_pairs(cfg.num_examples, cfg.seed)]
    elif cfg.hf_format is not None:
        examples = _load_hf(cfg)
    else:
        examples = [ex for path in _data_files(cfg.source) for ex in _load_file(path, cfg)]
    if not examples:
        raise DataError(f"data.source {cfg.source!r} holds no examples")
    return examples


def _missing(source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"data.source {source!r}: no such file or directory; use 'embedded', a .jsonl or .txt file "
        "(or a directory of them), or local files with data.hf_format set"
    )


def _data_files(source: str) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise _missing(source)
    if not path.is_dir():
        if path.suffix not in NATIVE_SUFFIXES:
            raise DataError(
                f"data.source {source!r}: unknown file extension {path.suffix!r}; valid: "
                f"{', '.join(NATIVE_SUFFIXES)}, or set data.hf_format ({', '.join(HF_FORMATS)}) "
                "for .json, .csv, .parquet and other files"
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in NATIVE_SUFFIXES)
    if not files:
        raise DataError(f"data.source {source!r}: directory holds no {' or '.join(NATIVE_SUFFIXES)} files")
    return files


def _load_file(path: Path, cfg: DataConfig) -> list[Example]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix == ".txt":
        return _txt_examples(text)
    return [
        _to_example(_parse_json_line(line, f"{path} line {n}"), cfg, f"{path} line {n}")
        for n, line in enumerate(text.split("\n"), start=1)  # not splitlines: U+2028 may sit in a string
        if line.strip()
    ]


def _txt_examples(text: str) -> list[Example]:
    """Paragraphs (split on blank lines) are the examples, so one file still gives an eval split."""
    paragraphs = (p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text))
    return [("", p) for p in paragraphs if p.strip()]


def _parse_json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None


def _to_example(record: Any, cfg: DataConfig, where: str) -> Example:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def field(key: str) -> str:
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        return record[key]

    def present(key: str) -> bool:  # datasets fills a column a row lacks with None
        return record.get(key) is not None

    if present(cfg.text_field):
        return "", field(cfg.text_field)
    for prompt_key, response_key in ((cfg.prompt_field, cfg.response_field), *PAIR_ALIASES):
        if present(prompt_key) and present(response_key):
            prompt = field(prompt_key)
            if prompt_key == "instruction" and record.get("input"):  # Alpaca's optional context
                prompt = f"{prompt}\n{field('input')}"
            return format_pair(prompt, field(response_key))
    found = sorted(k for k in record if present(k))
    raise DataError(
        f"{where}: fields found {found}; expected {cfg.text_field!r}, or {cfg.prompt_field!r} and "
        f"{cfg.response_field!r} (or 'instruction' and 'output'); set data.text_field or "
        "data.prompt_field / data.response_field to the file's names"
    )


def _load_hf(cfg: DataConfig) -> list[Example]:
    if not glob.glob(cfg.source, recursive=True):  # data_files may be a glob pattern
        raise _missing(cfg.source)
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise DataError("data.hf_format needs the datasets package: pip install datasets") from None
    rows = datasets.load_dataset(cfg.hf_format, data_files=cfg.source, split="train")
    return [_to_example(row, cfg, f"{cfg.source} row {i}") for i, row in enumerate(rows)]


def split_examples(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): hold out whole examples, before packing, so no eval text shares a train block.

    The held-out set depends only on ``seed`` and ``len(examples)``; both splits keep file order.
    """
    _check_fraction(eval_fraction)
    n_eval = max(1, round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise DataError(
            f"{len(examples)} examples leave none for training after holding out {n_eval} "
            f"(data.eval_fraction={eval_fraction}); add data or set data.eval_fraction=0"
        )
    held = set(random.Random(f"split:{seed}").sample(range(len(examples)), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [ex for i, ex in enumerate(examples) if i in held]


# --- packing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBlocks:
    """Fixed-length blocks of concatenated examples: ``input_ids`` and ``labels``, (N, T) int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def pack_examples(
    examples: list[Example], tokenizer: Tokenizer, seq_len: int, pad_last: bool = False
) -> PackedBlocks:
    """Concatenate ``prompt + completion + eos`` over all examples and cut into ``seq_len`` blocks.

    The tail short of a block is dropped, or with ``pad_last`` (eval, where every token counts)
    padded with eos labelled -100.
    """
    ids, labels = _token_stream(examples, tokenizer)
    if pad_last:
        pad = -len(ids) % seq_len
        ids += [tokenizer.eos_token_id] * pad
        labels += [IGNORE_INDEX] * pad
    n = len(ids) // seq_len
    return PackedBlocks(
        input_ids=torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len),  # (N, T)
        labels=torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len),  # (N, T)
    )


def _token_stream(examples: list[Example], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for prompt, completion in examples:
        prompt_ids = tokenizer.encode(prompt) if prompt else []
        completion_ids = [*tokenizer.encode(completion), eos]  # eos is trained: the model learns to stop
        ids += prompt_ids + completion_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, labels


# --- loaders ------------------------------------------------------------------------------------


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need dp_size >= 1 and 0 <= dp_rank < dp_size")


class PackedLoader:
    """Endless, DP-sharded, resumable ``(input_ids, labels)`` micro-batches, each (B, T) int64.

    Every rank computes the same seeded shuffle per epoch, so no communication is needed: DP rank r
    takes blocks ``[p + r*B, p + (r+1)*B)`` of the epoch's order at position p, and p advances by
    ``B * D`` per batch. An epoch ends when fewer than ``B * D`` blocks remain; that tail is left out
    (a different one each epoch) so all DP ranks step in lockstep.
    """

    def __init__(
        self, blocks: PackedBlocks, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0
    ) -> None:
        _check_dp(dp_rank, dp_size)
        self.global_batch = micro_batch_size * dp_size
        if len(blocks) < self.global_batch:
            raise DataError(
                f"the train split packs into {len(blocks)} blocks of seq_len={blocks.seq_len}; one step "
                f"needs micro_batch_size * dp_size = {micro_batch_size} * {dp_size} = {self.global_batch}; "
                "add data (data.num_examples for 'embedded') or lower data.seq_len or micro_batch_size"
            )
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.epoch = 0
        self.position = 0  # blocks of this epoch's order taken so far, by all DP ranks together
        self._order = self._epoch_order()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.blocks) // self.global_batch

    def _epoch_order(self) -> torch.Tensor:
        order = list(range(len(self.blocks)))
        # a str seed is hashed with sha512: a distinct, run-independent stream per (seed, epoch)
        random.Random(f"blocks:{self.seed}:{self.epoch}").shuffle(order)
        return torch.tensor(order, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > len(self.blocks):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        start = self.position + self.dp_rank * self.micro_batch_size
        idx = self._order[start : start + self.micro_batch_size]  # (B,)
        self.position += self.global_batch
        return self.blocks.input_ids[idx], self.blocks.labels[idx]  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        """Plain ints. ``position`` counts blocks of all DP ranks, so a resume may change dp_size."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_blocks": len(self.blocks),
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key, mine in (("num_blocks", len(self.blocks)), ("seed", self.seed)):
            if state[key] != mine:
                raise DataError(
                    f"loader state was saved with {key}={state[key]} but this loader has {key}={mine}; "
                    "resuming needs the same data, tokenizer, seq_len and seed"
                )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


class EvalLoader:
    """Finite, in-order ``(input_ids, labels)`` batches of this DP rank's eval blocks; re-iterable.

    DP rank r takes blocks r, r + D, r + 2D, ... of the split (of its first ``max_blocks``, when
    given): together the ranks cover every block once, so summed token losses and token counts
    give the same eval loss at any DP degree. Ranks may hold one batch more than others; eval's
    only DP collective is the final sum. The last batch may hold fewer than B blocks.
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        max_blocks: int = 0,
    ) -> None:
        _check_dp(dp_rank, dp_size)
        n = min(max_blocks, len(blocks)) if max_blocks > 0 else len(blocks)
        self.input_ids = blocks.input_ids[:n][dp_rank::dp_size]  # (ceil((n - r) / D), T)
        self.labels = blocks.labels[:n][dp_rank::dp_size]
        self.micro_batch_size = micro_batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.input_ids) / self.micro_batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.input_ids), self.micro_batch_size):
            yield self.input_ids[i : i + self.micro_batch_size], self.labels[i : i + self.micro_batch_size]


# --- entry point and model checks ---------------------------------------------------------------


def build_loaders(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    dp_rank: int = 0,
    dp_size: int = 1,
    model_config: PretrainedConfig | None = None,
    eval_max_blocks: int = 0,
) -> tuple[PackedLoader, EvalLoader | None]:
    """Load, split, pack and shard; every check runs here, before a training step.

    ``dp_rank`` / ``dp_size`` are the rank and size of the mesh's DP dimension (not the world), so
    the TP ranks of one group read the same batches. ``model_config`` adds the model checks.
    ``eval_max_blocks`` > 0 evaluates on the split's first blocks only.
    """
    if model_config is not None:
        check_seq_len(cfg.seq_len, model_config)
    train_examples, eval_examples = split_examples(load_examples(cfg), cfg.eval_fraction, cfg.seed)
    train = pack_examples(train_examples, tokenizer, cfg.seq_len)
    if model_config is not None:
        check_vocab(train, model_config)
    loader = PackedLoader(train, cfg.micro_batch_size, dp_rank, dp_size, cfg.seed)
    if not eval_examples:
        return loader, None
    evals = pack_examples(eval_examples, tokenizer, cfg.seq_len, pad_last=True)
    return loader, EvalLoader(evals, cfg.micro_batch_size, dp_rank, dp_size, eval_max_blocks)


DEFAULT_SEQ_LEN = 512


def fit_seq_len(seq_len: int | None, model_config: PretrainedConfig, log=print) -> int:
    """``seq_len``, or when unset the model's ``max_position_embeddings`` capped at DEFAULT_SEQ_LEN
    (said through ``log``); an explicit value over the model's limit fails in ``check_seq_len``."""
    if seq_len is not None:
        return seq_len
    limit = getattr(model_config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    chosen = min(limit, DEFAULT_SEQ_LEN)
    log(f"data.seq_len not set: using {chosen} (max_position_embeddings={limit}, at most {DEFAULT_SEQ_LEN})")
    return chosen


def check_seq_len(seq_len: int, model_config: PretrainedConfig) -> None:
    """Raise if ``seq_len`` exceeds the model's position table (configs without one pass)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={limit}; "
            f"use data.seq_len <= {limit}"
        )


def check_vocab(blocks: PackedBlocks, model_config: PretrainedConfig) -> None:
    """Raise if a token id is outside the model's embedding table (tokeniser and model mismatch)."""
    top = int(blocks.input_ids.max()) if len(blocks) else -1
    if top >= model_config.vocab_size:
        raise DataError(
            f"token id {top} is outside the model's vocab_size={model_config.vocab_size}: the tokenizer "
            "does not match the model; use the model's own tokenizer ('bytes' needs vocab_size >= 256)"
        )


def byte_batches(
    pairs: list[Example], batch_size: int, seq_len: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches, each (batch_size, seq_len), of byte-tokenised packed pairs:
    the pipeline above without an eval split or DP sharding (``bdlora demo`` uses it)."""
    examples = [format_pair(p, r) for p, r in pairs]
    return PackedLoader(pack_examples(examples, ByteTokenizer(), seq_len), batch_size, seed=seed)
