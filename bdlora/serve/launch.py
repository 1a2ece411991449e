"""What ``launch/vllm_serve.sh RUN_DIR`` serves: the run's base model and adapter, as arguments of
vLLM's OpenAI-compatible server (``bdlora serve-args``), checked against the TP degree before vLLM starts."""

from __future__ import annotations

import json
from pathlib import Path

from bdlora.serve.vllm_plugin import bdlora_nblocks
from bdlora.train.export import ExportError, open_run, staged_dir
from bdlora.train.modeling import resolve_model_dir

# vLLM's --max-lora-rank takes one of these values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory above ``RUN/checkpoints/step_*`` (a checkpoint's own dir otherwise)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def adapter_rank(config: dict) -> int:
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int:
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise ExportError(f"adapter rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def check_tp(adapter: Path, config: dict, tp: int) -> None:
    nblocks = bdlora_nblocks(config) or 1  # the plugin's reading of use_bdlora; dense: any degree
    if tp < 1 or (nblocks > 1 and nblocks % tp):
        raise ExportError(
            f"--tp {tp}: adapter {adapter} is BD-LoRA with nblocks={nblocks}, which serves at a "
            f"tensor-parallel degree dividing {nblocks}"
        )


def preset_base(run, out: Path) -> Path:
    """A preset run's base model written once as a model directory (vLLM needs one on disk)."""
    from bdlora.presets import build_model
    from bdlora.train.data import ByteTokenizer
    from bdlora.train.export import hf_byte_tokenizer

    if (out / "config.json").is_file():
        return out
    model = build_model(run.model.name, seed=run.model.seed)
    model.config.eos_token_id = model.generation_config.eos_token_id = ByteTokenizer.eos_token_id
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        hf_byte_tokenizer().save_pretrained(tmp)
    return out


def serve_args(path: str | Path, tp: int = 1) -> list[str]:
    """vLLM server arguments for the run (or checkpoint) at ``path``: base model, its adapter
    under the run's name, the smallest ``--max-lora-rank`` that holds it, TP degree and dtype."""
    run = open_run(path)
    run_dir = run_dir_of(run.checkpoint)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(
            f"{run_dir} has no adapter/ (a finished run writes one); write it with: "
            f"bdlora export {run_dir} --format peft-bdlora --out {adapter}"
        )
    config = json.loads((adapter / "adapter_config.json").read_text())
    check_tp(adapter, config, tp)
    base = resolve_model_dir(run.model, is_main=True) or preset_base(run, run_dir / "serving" / "base")
    return [
        "--model",
        str(base),
        "--enable-lora",
        "--lora-modules",
        f"{run_dir.name}={adapter}",
        "--max-lora-rank",
        str(vllm_max_lora_rank(adapter_rank(config))),
        "--tensor-parallel-size",
        str(tp),
        "--dtype",
        run.model.dtype,
    ]
