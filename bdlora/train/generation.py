"""Greedy completions of several prompts in one batch, each prompt by its own adapter.

``bdlora generate RUN --adapter math=RUN2 --adapter chat=PEFT_DIR --prompt P1 --prompt P2
--adapter-names math,chat`` builds RUN's base model at TP 1 (with RUN's own adapter as
``default``), loads each ``--adapter`` beside it, and decodes every prompt in one left-padded
batch through ``model.generate(..., adapter_names=[...])`` (``bdlora.mixed_batch``): one forward
per new token for the whole batch, each row adding its own adapter's delta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.layers import BASE_ADAPTER
from bdlora.model import adapters_of
from bdlora.parallel.checkpoint import load_sharded_adapter
from bdlora.peft_io import CONFIG_NAME, load_adapter
from bdlora.train.config import ModelConfig
from bdlora.train.data import Tokenizer
from bdlora.train.export import ExportError, find_checkpoint, load_model, open_run, prompt_text
from bdlora.train.modeling import resolve_model_dir, tokenizer_for

RUN_ADAPTER = "default"  # the name RUN's own adapter loads under


def parse_adapter_option(text: str) -> tuple[str, str]:
    """``NAME=DIR`` (a ``--adapter`` value) -> (name, dir)."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise BDLoraConfigError(f"--adapter {text!r}: write NAME=DIR (a run, checkpoint or PEFT adapter dir)")
    if name in (RUN_ADAPTER, BASE_ADAPTER):
        raise BDLoraConfigError(
            f"--adapter {text!r}: {name!r} is reserved ({RUN_ADAPTER!r}: the run's own adapter, "
            f"{BASE_ADAPTER!r}: the base model alone); pick another name"
        )
    return name, directory


def prompt_adapters(
    names: Sequence[str] | None, prompts: int, adapters: Sequence[str], run_adapter: bool
) -> list[str]:
    """One adapter name per prompt: ``names`` (one name: every prompt), by default the run's own
    adapter (the base with ``run_adapter=False``); every name loaded or ``__base__``."""
    default = RUN_ADAPTER if run_adapter else BASE_ADAPTER
    names = list(names) if names else [default]
    if len(names) == 1:
        names = names * prompts
    if len(names) != prompts:
        raise BDLoraConfigError(
            f"--adapter-names gives {len(names)} names for {prompts} prompts: give one per --prompt, "
            f"or one for all"
        )
    loaded = [*([RUN_ADAPTER] if run_adapter else []), *adapters]
    unknown = sorted(set(names) - set(loaded) - {BASE_ADAPTER})
    if unknown:
        raise BDLoraConfigError(
            f"--adapter-names: no adapter {', '.join(map(repr, unknown))}; loaded: "
            f"{', '.join(loaded) or 'none'} ({BASE_ADAPTER!r}: the base model alone)"
        )
    return names


def _base_model_key(cfg: ModelConfig) -> tuple:
    """What decides a run's base weights and tokens."""
    source = str(getattr(cfg.source, "value", cfg.source))
    weights = {"preset": (cfg.name, cfg.seed), "path": (cfg.path,)}.get(source, ())
    return source, *weights, cfg.tokenizer


def _describe(cfg: ModelConfig) -> str:
    source = str(getattr(cfg.source, "value", cfg.source))
    where = {"preset": f"{cfg.name}, seed {cfg.seed}", "path": str(cfg.path)}.get(source, source)
    return f"{source} {where}, tokenizer {cfg.tokenizer or 'its own'}"


def load_named_adapter(model: nn.Module, base: ModelConfig, name: str, source: str | Path) -> None:
    """Add adapter ``name`` from a PEFT adapter dir, or a run or checkpoint trained on ``base``."""
    source = Path(source)
    if (source / CONFIG_NAME).is_file():
        load_adapter(model, source, name)
        return
    run = open_run(source)
    if _base_model_key(run.model) != _base_model_key(base):
        raise ExportError(
            f"--adapter {name}={source}: trained on another base model or tokenizer "
            f"({_describe(run.model)}) than the run the prompts run on ({_describe(base)})"
        )
    load_sharded_adapter(model, find_checkpoint(source), name)


@torch.no_grad()
def greedy_batch(
    model: nn.Module, prompts: list[list[int]], names: list[str], max_new_tokens: int, eos_token_id: int
) -> list[list[int]]:
    """Up to ``max_new_tokens`` argmax tokens after each prompt, stopping before eos; prompts
    left-padded into one batch, prompt ``i`` run by adapter ``names[i]``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[eos_token_id] * (width - len(p)) + p for p in prompts])  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    mixed = {"adapter_names": names} if adapters_of(model) else {}  # no adapter loaded: the base
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        **mixed,
    )
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return completions


def generate_batch(
    path: str | Path,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    adapters: Mapping[str, str | Path] | None = None,
    adapter_names: Sequence[str] | None = None,
    run_adapter: bool = True,
    raw: bool = False,
) -> list[tuple[str, str]]:
    """(adapter, greedy completion) of each prompt by RUN's base model plus the adapter named for
    it: RUN's own (``default``, unless ``run_adapter=False``), one of ``adapters`` (name -> PEFT
    adapter dir, or run or checkpoint trained on the same base), or ``__base__``; one batch."""
    adapters = dict(adapters or {})
    names = prompt_adapters(adapter_names, len(prompts), list(adapters), run_adapter)
    run = open_run(path)
    model_dir = resolve_model_dir(run.model, is_main=True)
    tokenizer: Tokenizer = tokenizer_for(run.model, model_dir)
    ids = [tokenizer.encode(prompt_text(run, p, raw)) for p in prompts]
    empty = [i + 1 for i, tokens in enumerate(ids) if not tokens]
    if empty:
        raise ExportError(f"prompt {empty[0]} is empty after tokenisation; give some text")
    model = load_model(run, model_dir, adapter=run_adapter)
    for name, source in adapters.items():
        load_named_adapter(model, run.model, name, source)
    tokens = greedy_batch(model.eval(), ids, names, max_new_tokens, tokenizer.eos_token_id)
    return [(name, tokenizer.decode(t)) for name, t in zip(names, tokens)]
