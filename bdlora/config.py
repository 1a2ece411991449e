"""The pattern config: one ordered map from module-name regex to per-module overrides.

A pattern key ``KEY`` matches a module whose qualified name (as in ``model.named_modules()``)
it matches in full, or whose dot-bounded suffix it matches in full:
``re.fullmatch(r"(?:.*\\.)?(?:KEY)", name)``. So ``down_proj``, ``layers\\.0\\..*`` and ``.*_proj``
all do what one expects. The first matching key wins; a key mapped to ``None`` excludes the module.
Start a key with ``\\A`` to match the full qualified name only.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from bdlora.roles import Role

INIT_STRATEGIES = ("lora", "gaussian", "base_stats")
UNMATCHED_ACTIONS = ("error", "warn", "ignore")
OVERRIDE_KEYS = ("rank", "alpha", "dropout", "init", "role")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BDLoraConfigError(ValueError):
    """A pattern config that cannot be applied; the message names the key, module and value."""


def compile_key(key: str, where: str) -> re.Pattern[str]:
    """Compile a pattern key into the suffix-matching regex; ``where`` names it in errors."""
    try:
        return re.compile(rf"(?:.*\.)?(?:{key})")
    except re.error as err:
        raise BDLoraConfigError(f"{where}: {key!r} is not a valid regular expression ({err})") from None


def _closest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.0)
    return match[0] if match else ""


@dataclass(frozen=True)
class ModuleSettings:
    """The settings one module ends up with after the patterns are applied."""

    rank: int
    alpha: float
    dropout: float
    init: str
    role: Role | None  # None: take the role from the model's TP plan
    pattern: str | None  # the key that decided, None for the global defaults

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _check_settings(settings: ModuleSettings, where: str, nblocks: int) -> None:
    if not isinstance(settings.rank, int) or settings.rank <= 0:
        raise BDLoraConfigError(f"{where}: rank must be a positive integer, got {settings.rank!r}")
    if settings.rank % nblocks:
        raise BDLoraConfigError(
            f"{where}: rank {settings.rank} is not divisible by nblocks={nblocks}; "
            f"use a multiple of {nblocks} (e.g. {nblocks * max(1, round(settings.rank / nblocks))})"
        )
    if not isinstance(settings.alpha, (int, float)) or not settings.alpha > 0:
        raise BDLoraConfigError(f"{where}: alpha must be a positive number, got {settings.alpha!r}")
    if not isinstance(settings.dropout, (int, float)) or not 0.0 <= settings.dropout < 1.0:
        raise BDLoraConfigError(f"{where}: dropout must lie in [0, 1), got {settings.dropout!r}")
    if settings.init not in INIT_STRATEGIES:
        raise BDLoraConfigError(
            f"{where}: unknown init {settings.init!r}; valid: {', '.join(INIT_STRATEGIES)}"
        )


@dataclass
class BDLoraConfig:
    """Global adapter settings plus ordered per-module ``patterns``.

    ``patterns`` maps a regex key to a dict of overrides (keys: rank, alpha, dropout, init, role) or
    to ``None`` to exclude the modules it matches. Only modules matched by ``target_modules``
    (same key syntax) are adapted at all.
    """

    rank: int = 8
    alpha: float = 16.0
    nblocks: int = 2
    dropout: float = 0.0
    init: str = "lora"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # MoE expert tensors to adapt (PEFT's name): "gate_up_proj", "down_proj", or keys like
    # "layers\\.[0-3]\\..*experts.down_proj"; matched against "<experts module>.<tensor>"
    target_parameters: list[str] = field(default_factory=list)
    patterns: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    on_unmatched_pattern: str = "error"  # or "warn", "ignore"

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.target_parameters = list(self.target_parameters or [])
        self.patterns = dict(self.patterns or {})
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check everything that does not need the model; raises BDLoraConfigError."""
        if not isinstance(self.nblocks, int) or self.nblocks <= 0:
            raise BDLoraConfigError(f"nblocks must be a positive integer, got {self.nblocks!r}")
        if self.on_unmatched_pattern not in UNMATCHED_ACTIONS:
            raise BDLoraConfigError(
                f"on_unmatched_pattern must be one of {', '.join(UNMATCHED_ACTIONS)}, "
                f"got {self.on_unmatched_pattern!r}"
            )
        if not self.target_modules and not self.target_parameters:
            raise BDLoraConfigError(
                "target_modules and target_parameters are empty: name at least one module, e.g. 'q_proj'"
            )
        self._targets = [compile_key(k, f"target_modules entry {k!r}") for k in self.target_modules]
        self._param_targets = [
            compile_key(k, f"target_parameters entry {k!r}") for k in self.target_parameters
        ]
        _check_settings(self.defaults(), "global settings", self.nblocks)
        self._compiled: list[tuple[str, re.Pattern[str], dict[str, Any] | None]] = []
        for key, overrides in self.patterns.items():
            where = f"patterns[{key!r}]"
            checked = None if overrides is None else self._check_overrides(key, overrides)
            self._compiled.append((key, compile_key(key, where), checked))

    def _check_overrides(self, key: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        where = f"patterns[{key!r}]"
        if not isinstance(overrides, Mapping):
            raise BDLoraConfigError(
                f"{where}: expected a dict of overrides or None (exclude), got {overrides!r}"
            )
        for name in overrides:
            if name not in OVERRIDE_KEYS:
                raise BDLoraConfigError(
                    f"{where}: unknown override key {name!r}; did you mean "
                    f"{_closest(name, OVERRIDE_KEYS)!r}? Valid keys: {', '.join(OVERRIDE_KEYS)}"
                )
        overrides = dict(overrides)
        if "role" in overrides:
            try:
                overrides["role"] = Role.parse(overrides["role"], where)
            except ValueError as err:
                raise BDLoraConfigError(str(err)) from None
        _check_settings(replace(self.defaults(), **overrides), where, self.nblocks)
        return overrides

    def defaults(self) -> ModuleSettings:
        return ModuleSettings(self.rank, self.alpha, self.dropout, self.init, None, None)

    # -- matching ---------------------------------------------------------------------------
    def is_target(self, name: str) -> bool:
        return any(regex.fullmatch(name) for regex in self._targets)

    def is_target_parameter(self, name: str) -> bool:
        """Whether expert tensor ``name`` (``<experts module>.gate_up_proj``) is adapted."""
        return any(regex.fullmatch(name) for regex in self._param_targets)

    def match(self, name: str) -> tuple[str | None, ModuleSettings | None]:
        """The deciding pattern key and the module's settings (None: excluded by that key)."""
        for key, regex, overrides in self._compiled:
            if regex.fullmatch(name):
                if overrides is None:
                    return key, None
                return key, replace(self.defaults(), pattern=key, **overrides)
        return None, self.defaults()

    def unmatched_patterns(self, names: Iterable[str]) -> list[str]:
        """Pattern keys that match none of ``names`` (the targeted modules)."""
        names = list(names)
        return [k for k, regex, _ in self._compiled if not any(regex.fullmatch(n) for n in names)]

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["patterns"] = {
            k: None if v is None else {n: (x.value if isinstance(x, Role) else x) for n, x in v.items()}
            for k, v in self.patterns.items()
        }
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BDLoraConfig:
        """From a mapping of the fields, plus ``groups`` and ``bands`` (see ``group_band_patterns``),
        which become pattern keys after the mapping's own ``patterns``."""
        names = [f.name for f in fields(cls)]
        valid = [*names, "groups", "bands"]
        for key in data:
            if key not in valid:
                raise BDLoraConfigError(
                    f"unknown config key {key!r}; did you mean {_closest(key, valid)!r}? "
                    f"Valid keys: {', '.join(valid)}"
                )
        data = dict(data)
        generated = group_band_patterns(data.pop("groups", None) or {}, data.pop("bands", None) or {})
        user = dict(data.get("patterns") or {})
        data["patterns"] = {**user, **{k: v for k, v in generated.items() if k not in user}}
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> BDLoraConfig:
        """Load from a YAML file path or a YAML string; a file that is not UTF-8 YAML is an error
        naming the file, the line and the problem."""
        where = str(source) if _is_file(source) else "YAML string"
        data = load_yaml_text(Path(source).read_bytes() if _is_file(source) else str(source), where)
        if not isinstance(data, Mapping):
            raise BDLoraConfigError(
                f"{where}: expected a YAML mapping of config keys, got {type(data).__name__}"
            )
        return cls.from_dict(data)

    # -- PEFT interop -----------------------------------------------------------------------
    @classmethod
    def from_peft(cls, lora_config: Any) -> BDLoraConfig:
        """Convert a PEFT ``LoraConfig`` (object or dict) keeping PEFT's matching semantics.

        PEFT looks rank, alpha and the block-diagonal side up independently; first-match-wins over
        one ordered map reproduces that with one key per combination, most specific first.
        """
        cfg = lora_config if isinstance(lora_config, Mapping) else asdict(lora_config)
        for option, why in _UNSUPPORTED_PEFT.items():
            if cfg.get(option):
                raise BDLoraConfigError(f"{option}={cfg[option]!r} is not supported: {why}")
        targets = cfg.get("target_modules")
        parameters = list(cfg.get("target_parameters") or [])
        if targets is None and not parameters:
            raise BDLoraConfigError("PEFT config has no target_modules; list the modules to adapt")
        targets = [] if targets is None else targets
        if isinstance(targets, str):
            target_keys = [rf"\A(?:{targets})"]
        else:
            target_keys = [re.escape(t) for t in sorted(targets)]
        # a 2-D parameter (a MoE router's ``gate.weight``) is its module's adapter in bdlora
        target_keys += [re.escape(p.removesuffix(".weight")) for p in parameters if p.endswith(".weight")]
        patterns: dict[str, dict[str, Any] | None] = {}
        excluded = cfg.get("exclude_modules") or []
        if isinstance(excluded, str):
            patterns[rf"\A(?:{excluded})"] = None
        else:
            patterns.update({re.escape(e): None for e in sorted(excluded)})
        bd = cfg.get("use_bdlora") or {}
        bd = bd if isinstance(bd, Mapping) else asdict(bd)
        roles = [(rf".*{re.escape(s)}.*", {"role": Role.ROW}) for s in bd.get("target_modules_bd_a") or []]
        roles += [
            (rf".*{re.escape(s)}.*", {"role": Role.COLUMN}) for s in bd.get("target_modules_bd_b") or []
        ]
        dims = [
            [(k, {"rank": int(v)}) for k, v in (cfg.get("rank_pattern") or {}).items()],
            [(k, {"alpha": float(v)}) for k, v in (cfg.get("alpha_pattern") or {}).items()],
            roles,
        ]
        patterns.update(_combine_independent(dims))
        return cls(
            rank=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            nblocks=int(bd.get("nblocks", 1)) if bd else 1,
            dropout=float(cfg.get("lora_dropout") or 0.0),
            target_modules=target_keys,
            target_parameters=[re.escape(p) for p in parameters if not p.endswith(".weight")],
            patterns=patterns,
            on_unmatched_pattern="ignore",
        )


_UNSUPPORTED_PEFT = {
    "use_rslora": "scale is alpha / rank",
    "use_dora": "bdlora has no DoRA magnitude vector",
    "lora_bias": "bdlora's B factors have no bias",
    "layers_to_transform": "map the layers to leave out to None in patterns instead",
}


def group_band_patterns(
    groups: Mapping[str, Mapping[str, Any]], bands: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Pattern keys for per-group and per-layer-band settings: rank sweeps without regex keys.

    ``groups``: name -> ``{modules: [q_proj, ...], rank: .., alpha: .., ...}``; ``bands``: name ->
    ``{layers: "0-7", rank: .., ...}`` (``layers``: a range ``"a-b"``, a list, or both comma-joined,
    counted in ``layers.N``). Unset (None) settings are left out; a group or band setting nothing
    adds no key. A module in a band and a group gets both, the band's value winning where both set
    one; a module in two groups (or bands) takes the first. The band x group keys come first in
    the result, so first-match-wins gives exactly that.
    """
    group_keys = []
    for name, group in groups.items():
        where = f"groups.{name}"
        modules = _field(group, "modules", where)
        if isinstance(modules, str) or not modules:
            raise BDLoraConfigError(
                f"{where}.modules: give a non-empty list of module names, got {modules!r}"
            )
        overrides = _set_overrides(group, where, "modules")
        if overrides:
            group_keys.append(("(?:" + "|".join(str(m) for m in modules) + ")", overrides))
    band_keys = []
    for name, band in bands.items():
        where = f"bands.{name}"
        layers = parse_layers(_field(band, "layers", where), f"{where}.layers")
        overrides = _set_overrides(band, where, "layers")
        if overrides:
            band_keys.append((r"layers\.(?:" + "|".join(map(str, layers)) + r")\..*", overrides))
    return _combine_independent([group_keys, band_keys])


def _field(entry: Mapping[str, Any], name: str, where: str) -> Any:
    if not isinstance(entry, Mapping) or entry.get(name) is None:
        raise BDLoraConfigError(f"{where}: needs {name!r}, got {entry!r}")
    return entry[name]


def _set_overrides(entry: Mapping[str, Any], where: str, own: str) -> dict[str, Any]:
    for key in entry:
        if key != own and key not in OVERRIDE_KEYS:
            valid = ", ".join((own, *OVERRIDE_KEYS))
            raise BDLoraConfigError(
                f"{where}: unknown key {key!r}; did you mean {_closest(key, (own, *OVERRIDE_KEYS))!r}? "
                f"Valid keys: {valid}"
            )
    return {k: v for k, v in entry.items() if k != own and v is not None}


def parse_layers(spec: Any, where: str) -> list[int]:
    """Layer indices from ``"0-7"``, ``"0-3,8"``, ``5`` or ``[0, 1, 2]``; sorted, each once."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    layers: set[int] = set()
    for item in items:
        text = str(item).strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise BDLoraConfigError(
                f'{where}: {text!r} is not a layer index or range; write e.g. "0-7", "0-3,8" or [0, 1]'
            )
        first = int(match[1])
        layers.update(range(first, int(match[2] or first) + 1))
    return sorted(layers)


def load_yaml_text(text: str | bytes, where: str) -> Any:
    """``yaml.safe_load`` of a file's bytes (or a string), with a decoding or syntax error as one
    ``BDLoraConfigError`` line: ``where, line N, column M: problem``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BDLoraConfigError(f"{where}, {describe_undecodable(text, err)}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise BDLoraConfigError(f"{where}, {describe_yaml_error(err)}") from None


def describe_undecodable(data: bytes, err: UnicodeDecodeError) -> str:
    """``line N, column M: not UTF-8 text (byte 0x..); save the file as UTF-8`` for ``data``."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    byte = data[err.start : err.start + 1].hex()
    return f"line {line}, column {column}: not UTF-8 text (byte 0x{byte}); save the file as UTF-8"


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """``line N, column M: problem`` for a YAML syntax error, the problem alone without a position."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    problem = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


def _is_file(source: str | Path) -> bool:
    try:
        return Path(source).is_file()
    except OSError:  # a YAML string too long to be a file name
        return False


def _combine_independent(
    dims: list[list[tuple[str, dict[str, Any]]]],
) -> dict[str, dict[str, Any]]:
    """Ordered keys whose first match equals an independent first-match lookup in each of ``dims``.

    For every non-empty subset of dimensions (larger subsets first) and every choice of one key per
    chosen dimension (in each dimension's order), emit a key that requires all chosen keys to match.
    """
    out: dict[str, dict[str, Any]] = {}
    live = [d for d in dims if d]
    for size in range(len(live), 0, -1):
        for subset in itertools.combinations(live, size):
            for combo in itertools.product(*subset):
                if size == 1:
                    key = combo[0][0]
                else:
                    key = r"\A" + "".join(rf"(?=(?:.*\.)?(?:{k})\Z)" for k, _ in combo) + ".*"
                merged: dict[str, Any] = {}
                for _, overrides in combo:
                    merged.update(overrides)
                out.setdefault(key, merged)
    return out
