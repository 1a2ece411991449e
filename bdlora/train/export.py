"""A trained run as something others load: a PEFT adapter, a merged model, or a greedy completion.

Everything runs in one process at TP 1, on CPU, from a complete training checkpoint (``COMPLETE``
present) written at any TP degree: its ``trainer_state.json`` says how the base model was built
(``config.model``), and its adapter shards are concatenated back to full factors.

===============  =================================================================================
``peft-bdlora``  ``bdlora.save_adapter``: PEFT's ``LoraConfig(use_bdlora=...)``, packed factors
``peft-lora``    the same adapter with the block-diagonal factor expanded: plain LoRA
``merged``       a Hugging Face model directory, ``W + scale * B A`` folded into each adapted weight;
                 ``AutoModelForCausalLM.from_pretrained(out)`` needs neither bdlora nor PEFT
===============  =================================================================================

Every output is written into a hidden ``.<out>.partial-*`` directory beside ``out`` and renamed into
place when complete, so an interrupted export never leaves a half-written directory under ``out``.
Each holds ``bdlora_export.json`` (what was exported, from which checkpoint): ``--force`` replaces a
directory that has one, and refuses any other non-empty directory, the current one, and any that
holds the current directory or the run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.data import format_pair
from bdlora.layers import dense_factors, global_factor_shapes
from bdlora.model import merge_and_unload
from bdlora.parallel import from_pretrained, parallelize
from bdlora.parallel.checkpoint import full_factors, load_sharded_adapter, open_shards, read_shard_meta
from bdlora.parallel.experts import ExpertLayout
from bdlora.parallel.loading import weight_files
from bdlora.parallel.styles import LinearLayout, sharding_class
from bdlora.peft_io import save_adapter
from bdlora.plan import ModulePlan, Plan, resolve_plan
from bdlora.presets import build_model as build_preset
from bdlora.train.checkpoint import COMPLETE, STATE, newest_intact, verify_checkpoint
from bdlora.train.config import ModelConfig
from bdlora.train.data import ByteTokenizer, Tokenizer, build_tokenizer
from bdlora.train.modeling import drop_gguf_quantization, resolve_model_dir, tokenizer_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

FORMATS = ("peft-bdlora", "peft-lora", "merged")
# Which engines load each format as written (printed by ``bdlora export``; the README's "Serving").
ENGINES = {
    "peft-bdlora": "PEFT >= 0.20 (PeftModel.from_pretrained); vLLM with bdlora's plugin (bdlora installed "
    "beside vLLM; vLLM alone refuses use_bdlora)",
    "peft-lora": "PEFT; vLLM as is (--enable-lora --lora-modules NAME=DIR); every TP rank then computes the "
    "whole shrink or expand",
    "merged": "transformers (AutoModelForCausalLM.from_pretrained); vLLM as is (vllm serve DIR)",
}
MARKER = "bdlora_export.json"  # in every export: what --force may replace
# weights in formats other than safetensors: never copied into a merged export, where they would
# sit beside the merged safetensors still holding the unmerged base
UNMERGED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


class ExportError(ValueError):
    """A run, checkpoint or output directory that cannot be used; the CLI reports it and exits 2."""


@dataclass(frozen=True)
class TrainedRun:
    """A complete checkpoint, the model config it was trained on, and its step."""

    checkpoint: Path
    model: ModelConfig
    data_source: str
    step: int


# --- finding the checkpoint ----------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint that verifies, else the newest one of a run dir that
    does (saying on stderr which newer ones were skipped as damaged, and why)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / COMPLETE).is_file():
        verify_checkpoint(path)
        return path
    if (path / STATE).is_file() or path.name.startswith((".step_", "step_")):
        raise ExportError(
            f"{path} is an incomplete checkpoint (no {COMPLETE} marker: the run stopped while saving "
            "it); pass the run directory to take its newest complete checkpoint"
        )
    root = path if path.name == "checkpoints" else path / "checkpoints"
    if not root.is_dir():
        raise ExportError(
            f"{path} is neither a run directory (with checkpoints/) nor a checkpoint (with {COMPLETE})"
        )
    found = newest_intact(root, lambda message: print(message, file=sys.stderr, flush=True))
    if found is None:
        raise ExportError(
            f"{root} holds no complete checkpoint; the run saves one every checkpoint.every steps "
            "and at its end, so it stopped before the first"
        )
    return found


def open_run(path: str | Path) -> TrainedRun:
    checkpoint = find_checkpoint(path)
    state = json.loads((checkpoint / STATE).read_text())
    config = state.get("config") or {}
    if "model" not in config:
        raise ExportError(f"{checkpoint / STATE} has no config.model: not written by bdlora-train")
    known = {f.name for f in fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in config["model"].items() if k in known})
    source = config.get("data", {}).get("source", "")
    return TrainedRun(checkpoint, model, source, int(state.get("step", 0)))


# --- building the model --------------------------------------------------------------------------


def load_model(run: TrainedRun, model_dir: Path | None, adapter: bool = True) -> nn.Module:
    """The base model at TP 1 as the trainer built it, with the checkpoint's adapter unless told not."""
    meta = read_shard_meta(run.checkpoint)
    layout = dict(sharding=meta["sharding"], tp_plan=meta.get("tp_plan"))  # the run's roles
    dtype = getattr(torch, run.model.dtype)
    if model_dir is None:
        model = parallelize(build_preset(run.model.name, seed=run.model.seed).to(dtype), **layout)
    else:
        model = from_pretrained(model_dir, dtype=dtype, **layout)
        model.config.name_or_path = str(model_dir)  # PEFT's base_model_name_or_path
    if adapter:
        load_sharded_adapter(model, run.checkpoint)
    return model.eval()


# --- the run's tokenizer, beside merged weights --------------------------------------------------


def save_tokenizer(cfg: ModelConfig, model_dir: Path | None, out: Path) -> str:
    """Write the tokenizer the run trained with (``tokenizer_for``) into ``out``; returns what it was.

    A model directory's own tokenizer is already there (``merge_streaming`` copies it); a
    ``model.tokenizer`` replaces it; the byte tokenizer is written as :func:`hf_byte_tokenizer`.
    """
    if cfg.tokenizer not in (None, "bytes"):
        build_tokenizer(cfg.tokenizer).tokenizer.save_pretrained(out)
        return f"model.tokenizer={cfg.tokenizer}"
    if cfg.tokenizer is None and model_dir is not None:
        return f"the base model's own, from {model_dir}"
    hf_byte_tokenizer().save_pretrained(out)
    return f"UTF-8 bytes, eos id {ByteTokenizer.eos_token_id}"


def hf_byte_tokenizer() -> PreTrainedTokenizerFast:
    """:class:`ByteTokenizer` as a transformers tokenizer: ``AutoTokenizer.from_pretrained`` loads it
    and encodes text to its UTF-8 bytes, with id 0 (the NUL byte) as the eos token ``</s>``.

    A byte-level BPE without merges: the pre-tokenizer maps each byte to a printable character
    (GPT-2's table) and the vocabulary gives that character the byte's value as its id. A literal
    ``</s>`` in text stays four bytes (``split_special_tokens``), as it does in training.
    """
    from tokenizers import Tokenizer as Backend  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    eos = ByteTokenizer.eos_token_id
    vocab = {char: byte for byte, char in _gpt2_byte_chars().items() if byte != eos}
    backend = Backend(models.BPE({"</s>": eos, **vocab}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def _gpt2_byte_chars() -> dict[int, str]:
    """Byte -> the character ``tokenizers``' ByteLevel pre-tokenizer maps it to: printable Latin-1
    bytes stand for themselves, the other 68 for U+0100 onwards in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    others = iter(range(256, 512))
    return {byte: chr(byte if byte in printable else next(others)) for byte in range(256)}


# --- streaming merge -----------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset of its data section."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))  # little-endian u64 header length
        return json.loads(f.read(size)), 8 + size


def adapter_plan(model_dir: Path, checkpoint: Path) -> tuple[Plan, str]:
    """The checkpoint's adapter plan on ``model_dir``'s architecture (built on meta: no weights);
    expert tensors too, where the checkpoint's config has ``target_parameters``."""
    meta = read_shard_meta(checkpoint)
    return _plan_on(_skeleton(model_dir, meta), meta), meta["sharding"]


def _skeleton(model_dir: Path, meta: dict) -> nn.Module:
    """``model_dir``'s transformers model on the meta device, with the run's own TP plan (roles)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    if meta.get("tp_plan"):  # a run's own parallel.tp_plan decides its modules' roles
        skeleton.config.base_model_tp_plan = meta["tp_plan"]
    return skeleton


def _plan_on(skeleton: nn.Module, meta: dict) -> Plan:
    return resolve_plan(skeleton, BDLoraConfig.from_dict(meta["config"]))


def _saved_layout(meta: dict, m: ModulePlan) -> LinearLayout | ExpertLayout:
    """How module ``m``'s shards were split (``checkpoint.saved_layout``, from the plan: no layer)."""
    if m.experts:
        saved = meta.get("experts", {}).get(m.name, {})
        return ExpertLayout(m.role, saved.get("segments", 1), saved.get("ep", 1), m.fan_in_fan_out)
    return LinearLayout(m.role, meta.get("packed_segments", {}).get(m.name, 1))


def _full_factors(checkpoint: Path, plan: Plan, sharding: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Module name -> unsharded (A, B) as stored (block-diagonal factor packed), shape-checked;
    an expert tensor's carry the expert dim first: ``(E, ...)``."""
    meta = read_shard_meta(checkpoint)
    cls = sharding_class(sharding)
    out = {}
    with open_shards(checkpoint, "adapter", meta["tp"]) as shards:
        for m in plan.modules:
            a, b = full_factors(shards, m.name, _saved_layout(meta, m), cls)
            want = global_factor_shapes(m.role, m.d_in, m.d_out, m.rank, plan.global_nblocks)
            if m.experts:
                want = tuple((m.experts, *shape) for shape in want)
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise ExportError(
                    f"{checkpoint}: adapter of {m.name!r} has (A, B) shapes {tuple(a.shape)}, "
                    f"{tuple(b.shape)}; the model expects {want}: a different base model?"
                )
            out[m.name] = (a, b)
    return out


def _stored_targets(
    model_dir: Path, skeleton: nn.Module, plan: Plan
) -> dict[str, list[tuple[ModulePlan, tuple[int | slice, ...]]]]:
    """Checkpoint key -> the adapted modules whose weight it holds (part of), and where in it.

    The model key of a linear is ``<name>.weight``, of an expert tensor its own name; each is
    found in the checkpoint as ``from_pretrained`` finds it (:meth:`CheckpointIndex.parts`):
    Mixtral's ``experts.gate_up_proj`` is its per-expert ``w1`` (gate rows) and ``w3`` (up rows).
    """
    from bdlora.parallel.conversion import CheckpointIndex  # noqa: PLC0415  (imports transformers)

    try:
        index = CheckpointIndex(model_dir, skeleton)
    except ValueError as err:
        raise ExportError(str(err)) from err
    targets: dict[str, list] = {}
    missing = []
    for m in plan.modules:
        key = m.name if m.experts else f"{m.name}.weight"
        if key not in index:
            missing.append(key)
            continue
        for part in index.parts(key):
            targets.setdefault(part.key, []).append((m, part.index))
    if missing:
        raise ExportError(
            f"{model_dir}: no weight for adapted module(s) {sorted(missing)[:3]} in its safetensors "
            "files (a tied or renamed weight?); the adapter cannot be merged into this checkpoint"
        )
    return targets


def _add_delta(
    data: torch.Tensor,
    m: ModulePlan,
    factors: tuple[torch.Tensor, ...],
    nblocks: int,
    index: tuple,
    where: str,
) -> None:
    """``data += scale * B A`` in place, for the part ``index`` of module ``m``'s weight it holds.

    ``data`` is the stored tensor in fp32 and ``index`` where it sits in the model tensor (one int
    or slice per dim): an expert tensor's dim 0 is the expert (an int: ``data`` is that expert's
    alone), the last two are rows and columns as stored, ``(d_in, d_out)`` for transposed storage.
    Only the rows and columns ``data`` holds are computed: ``B[rows] @ A[:, cols]``.
    """
    a, b = factors
    if m.experts:
        expert, rest = index[0], index[1:]
        if isinstance(expert, int):
            pieces = [(expert, data)]
        else:
            pieces = [(e, data[i]) for i, e in enumerate(range(m.experts)[expert])]
    else:
        rest, pieces = index, [(None, data)]
    if len(rest) != 2 or not all(isinstance(s, slice) for s in rest):
        raise ExportError(f"{where}: cannot merge into a part {index} of {m.name!r}")
    rows, cols = (rest[1], rest[0]) if m.fan_in_fan_out else rest  # in (d_out, d_in) orientation
    for e, stored in pieces:
        a_e, b_e = (a, b) if e is None else (a[e], b[e])
        dense_a, dense_b = dense_factors(m.role, a_e, b_e, nblocks)  # (r, d_in), (d_out, r)
        base = stored.t() if m.fan_in_fan_out else stored  # (d_out, d_in) part
        want = (len(range(m.d_out)[rows]), len(range(m.d_in)[cols]))
        if tuple(base.shape) != want:
            raise ExportError(f"{where} holds {tuple(base.shape)} of {m.name!r}; its adapter gives {want}")
        base.addmm_(dense_b[rows], dense_a[:, cols], alpha=m.settings.scale)  # through the view


@torch.no_grad()
def merge_streaming(model_dir: str | Path, checkpoint: str | Path, out: str | Path) -> None:
    """Write ``model_dir`` with the checkpoint's adapter merged into ``out`` (an existing directory).

    Each safetensors file is copied under its own name, then each adapted weight in it is read alone,
    merged in fp32 (``W + scale * B_dense A_dense``), cast back to its dtype and written over its
    own bytes: dtypes, shapes, key names and order and the index are unchanged, and memory holds the
    adapter plus one base tensor. Expert tensors merge per expert in the checkpoint's own layout:
    per-expert tensors (Mixtral's ``experts.{e}.w1``, gate rows of ``experts.gate_up_proj``) each
    get their expert's rows, fused ones (gpt-oss, transposed) every expert's delta. Every other file
    (config, tokenizer, generation config) is copied.
    """
    model_dir, checkpoint, out = Path(model_dir), Path(checkpoint), Path(out)
    meta = read_shard_meta(checkpoint)
    skeleton = _skeleton(model_dir, meta)
    plan = _plan_on(skeleton, meta)
    factors = {
        name: tuple(t.float() for t in pair)
        for name, pair in _full_factors(checkpoint, plan, meta["sharding"]).items()
    }
    targets = _stored_targets(model_dir, skeleton, plan)
    sources = weight_files(model_dir)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.startswith(".") and path not in sources:
            if path.suffix not in UNMERGED_WEIGHT_SUFFIXES:
                shutil.copy2(path, out / path.name)
    drop_gguf_quantization(out)  # the weights written are floats, whatever the source was
    for src in sources:
        shutil.copy2(src, out / src.name)
        header, data_start = _safetensors_header(src)
        with open(out / src.name, "r+b") as dst:
            for key in [k for k in header if k in targets]:
                where = f"{src}: {key!r}"
                data = _read_tensor(src, key).float()
                for m, index in targets.pop(key):
                    _add_delta(data, m, factors[m.name], plan.global_nblocks, index, where)
                _write_tensor(dst, data_start, header[key], data, where=where)
    if targets:  # the index read these headers; only a file changed since could get here
        raise ExportError(
            f"{model_dir}: adapted weights {sorted(targets)[:3]} not found in its safetensors files"
        )


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    # a handle per tensor: safetensors reads through an mmap of the whole file, whose touched pages
    # count as resident until it is closed
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


def _write_tensor(dst, data_start: int, entry: dict, value: torch.Tensor, where: str) -> None:
    """Overwrite a tensor's bytes in place, cast to the dtype it has in the file."""
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(entry["dtype"])
    if dtype is None:
        raise ExportError(f"{where} is stored as {entry['dtype']}; merging supports F32, F16 and BF16")
    data = value.to(dtype).contiguous().view(-1).view(torch.uint8).numpy()
    start, end = entry["data_offsets"]
    if data.nbytes != end - start:
        raise ExportError(f"{where} takes {end - start} bytes in the file; the merged tensor {data.nbytes}")
    dst.seek(data_start + start)
    dst.write(data)


# --- export --------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuse, before anything is written, an ``out`` that replacing would lose something: the current
    directory or one above it, what the export reads, and a non-empty directory no export wrote."""
    where, cwd = out.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise ExportError(
            f"--out {out} is the current directory or holds it; the export replaces --out as a whole: "
            f"give a new directory, e.g. --out {cwd / 'export'}"
        )
    for path in protected:
        if where == path.resolve() or where in path.resolve().parents:
            raise ExportError(f"--out {out} would replace {path}, which the export reads; pick another")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    if not found:
        return
    if not (out / MARKER).is_file():
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ExportError(
            f"--out {out} exists and is not empty ({listed}) and holds no {MARKER}, so bdlora export "
            f"did not write it; --force replaces only an earlier export: pick a new path"
        )
    if not force:
        raise ExportError(f"--out {out} holds an earlier export: pick a new path, or --force to replace it")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` (replacing it) if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        _usual_modes(tmp)
        if out.exists():  # replaced only now, so a failed export keeps what was there
            _replace(out, tmp)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(out: Path, new: Path) -> None:
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    try:
        out.rename(old / out.name)
    except OSError as err:  # a mount point, say: nothing moved, so nothing is left behind
        old.rmdir()
        raise ExportError(f"--out {out} cannot be replaced ({err.strerror}); pick another") from err
    new.rename(out)
    shutil.rmtree(old)


def _usual_modes(directory: Path) -> None:
    """mkdtemp and the atomic file writes create private (0700 / 0600) entries; an export is meant
    to be shared, so give it the modes a plain mkdir / open would (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export(path: str | Path, format: str, out: str | Path, force: bool = False) -> TrainedRun:
    """Export the run or checkpoint at ``path`` to ``out`` as ``format`` (see the module table).

    ``merged`` from a model directory (``model.source`` ``path`` or ``smollm2``) streams the merge
    tensor by tensor (:func:`merge_streaming`), so the full model is never in memory; a preset has
    no weights on disk, so it is built (tiny), merged in memory and written with ``save_pretrained``.
    A merged export holds the run's tokenizer (:func:`save_tokenizer`).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    run, out = open_run(path), Path(os.path.abspath(out))  # abspath: "." and ".." get a name
    model_dir = resolve_model_dir(run.model, is_main=True)
    _check_out(out, force, [run.checkpoint, *([model_dir] if model_dir else [])])
    record = {"format": format, "checkpoint": str(run.checkpoint.resolve()), "step": run.step}
    with staged_dir(out) as tmp:
        if format == "merged" and model_dir is not None:
            merge_streaming(model_dir, run.checkpoint, tmp)
        elif format == "merged":
            _merged_preset(run).save_pretrained(tmp)
        else:
            save_adapter(load_model(run, model_dir), tmp, format=format)
        if format == "merged":
            record["tokenizer"] = save_tokenizer(run.model, model_dir, tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return run


def _merged_preset(run: TrainedRun) -> nn.Module:
    """The merged preset model, with the eos id the run packed examples with: a preset's config has
    its architecture's default (Llama's 2), the byte tokenizer's is 0; ``generate`` stops at it."""
    model = merge_and_unload(load_model(run, None))
    if run.model.tokenizer in (None, "bytes"):
        model.config.eos_token_id = ByteTokenizer.eos_token_id
        model.generation_config.eos_token_id = ByteTokenizer.eos_token_id
    return model


# --- generation ----------------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Up to ``max_new_tokens`` argmax tokens after ``ids``, stopping before eos; KV-cached."""
    step_ids = torch.tensor([ids])  # (1, T)
    past, out = None, []
    for _ in range(max_new_tokens):
        result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        next_id = int(result.logits[0, -1].argmax())
        if next_id == eos_token_id:
            break
        out.append(next_id)
        step_ids = torch.tensor([[next_id]])  # (1, 1)
    return out


def prompt_text(run: TrainedRun, prompt: str, raw: bool = False) -> str:
    """The prompt as the run trained on it: the embedded dataset's template unless ``raw``."""
    return prompt if raw or run.data_source != "embedded" else format_pair(prompt, "")[0]


def generate(
    path: str | Path, prompt: str, max_new_tokens: int = 32, adapter: bool = True, raw: bool = False
) -> str:
    """The greedy completion of ``prompt`` by the base model plus (unless ``adapter=False``) the adapter."""
    run = open_run(path)
    model_dir = resolve_model_dir(run.model, is_main=True)
    tokenizer: Tokenizer = tokenizer_for(run.model, model_dir)
    ids = tokenizer.encode(prompt_text(run, prompt, raw))
    if not ids:
        raise ExportError("the prompt is empty after tokenisation; give some text")
    model = load_model(run, model_dir, adapter=adapter)
    return tokenizer.decode(greedy_decode(model, ids, max_new_tokens, tokenizer.eos_token_id))
