"""``bdlora export`` / ``bdlora generate``: a run's adapter loads in vanilla PEFT, its merged model in
plain transformers, both with base+adapter logits; outputs are atomic and bad input exits 2."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bdlora import BDLoraConfig, apply_bdlora, load_adapter, merge_adapter
from bdlora.cli import main
from bdlora.parallel import parallelize
from bdlora.parallel.checkpoint import save_sharded_adapter
from bdlora.presets import build_model
from bdlora.train import export as export_mod
from bdlora.train.checkpoint import COMPLETE, STATE, step_dir_name, write_manifest
from bdlora.train.config import ModelConfig, TrainConfig
from bdlora.train.data import ByteTokenizer
from bdlora.train.export import MARKER, ExportError, export, generate, greedy_decode, merge_streaming
from tests.conftest import logits, randomize_lora_b, tiny_model

ATOL = dict(atol=1e-5, rtol=0)
# one fp32 rounding of W + s B A against two (W x, s B A x): a few ulps of the logits apart
MERGED_TOL = dict(atol=5e-5, rtol=0)
EXACT = dict(atol=1e-6, rtol=0)  # the same merge computed in memory
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))
ADAPTER = BDLoraConfig(rank=8, alpha=16, nblocks=2, patterns={"down_proj": {"rank": 16}})
STEP = 3


@dataclass(frozen=True)
class Run:
    """A run directory holding one complete checkpoint, and its base+adapter model in memory."""

    run_dir: Path
    model: nn.Module
    model_dir: Path | None = None
    tokenizer_dir: Path | None = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / step_dir_name(STEP)


def write_run(run_dir: Path, model: nn.Module, model_cfg: ModelConfig, **paths: Path) -> Run:
    """A complete training checkpoint of ``model``'s adapter, laid out as the trainer writes it."""
    run = Run(run_dir, model, **paths)
    save_sharded_adapter(model, run.checkpoint)
    state = {"step": STEP, "tp": 1, "config": asdict(TrainConfig(model=model_cfg))}
    (run.checkpoint / STATE).write_text(json.dumps(state))
    write_manifest(run.checkpoint)
    (run.checkpoint / COMPLETE).write_text(str(STEP))
    return run


def adapted(model: nn.Module) -> nn.Module:
    model = apply_bdlora(model, ADAPTER)
    randomize_lora_b(model, std=0.3)
    return model.eval()


def save_word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "Q:": 2, "A:": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory) -> Run:
    """A run on the tiny-llama preset (seed 2) with a nonzero adapter."""
    model = adapted(tiny_model("tiny-llama", seed=2))
    cfg = ModelConfig(source="preset", name="tiny-llama", seed=2)
    return write_run(tmp_path_factory.mktemp("preset_run"), model, cfg)


@pytest.fixture(scope="module")
def path_run(tmp_path_factory) -> Run:
    """A run on a local model directory saved in several safetensors shards, with a tokenizer.

    The run names the tokenizer's own directory (``model.tokenizer``): in the model directory,
    AutoTokenizer would follow config.json to Qwen2's BPE class, which this word-level one is not.
    """
    model_dir = tmp_path_factory.mktemp("model_dir")
    tiny_model("tiny-qwen2", seed=5).save_pretrained(model_dir, max_shard_size="100KB")
    save_word_tokenizer(model_dir)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    save_word_tokenizer(tokenizer_dir)
    model = adapted(build_model(str(model_dir)))
    cfg = ModelConfig(source="path", path=str(model_dir), tokenizer=str(tokenizer_dir))
    run_dir = tmp_path_factory.mktemp("path_run")
    return write_run(run_dir, model, cfg, model_dir=model_dir, tokenizer_dir=tokenizer_dir)


def merged_in_memory(model: nn.Module) -> nn.Module:
    merged = copy.deepcopy(model)
    merge_adapter(merged)
    return merged


def greedy_reference(model: nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    """Argmax decoding by full recompute, no KV cache: what greedy_decode must reproduce."""
    ids, out = list(ids), []
    for _ in range(n):
        next_id = int(logits(model, torch.tensor([ids]))[0, -1].argmax())
        if next_id == eos:
            break
        ids.append(next_id)
        out.append(next_id)
    return out


# --- exports load elsewhere with the same logits -------------------------------------------------


@pytest.mark.parametrize("fmt", ["peft-bdlora", "peft-lora"])
def test_peft_export_loads_in_vanilla_peft(preset_run, fmt, tmp_path):
    assert main(["export", str(preset_run.run_dir), "--format", fmt, "--out", str(tmp_path / "out")]) == 0
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama", seed=2), tmp_path / "out").eval()
    assert_close(logits(peft_model, IDS), logits(preset_run.model, IDS), **ATOL)
    base = logits(tiny_model("tiny-llama", seed=2), IDS)
    assert not torch.allclose(logits(peft_model, IDS), base, atol=1e-2)


def test_merged_preset_export_loads_in_plain_transformers(preset_run, tmp_path):
    export(preset_run.run_dir, "merged", tmp_path / "out")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close(logits(merged, IDS), logits(preset_run.model, IDS), **MERGED_TOL)
    assert_close(logits(merged, IDS), logits(merged_in_memory(preset_run.model), IDS), **EXACT)


def test_merged_path_export_streams_into_the_same_files(path_run, tmp_path, monkeypatch):
    for name in ("from_pretrained", "build_preset", "load_model"):  # the full model is never built
        monkeypatch.setattr(export_mod, name, lambda *a, **k: pytest.fail("streaming merge built a model"))
    out = tmp_path / "out"
    export(path_run.checkpoint, "merged", out)
    source_files = {p.name for p in path_run.model_dir.iterdir()}
    assert len([n for n in source_files if n.endswith(".safetensors")]) > 1
    assert {p.name for p in out.iterdir()} == source_files | {MARKER}  # shards, index, config, tokenizer
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(logits(merged, IDS), logits(path_run.model, IDS), **MERGED_TOL)
    assert_close(logits(merged, IDS), logits(merged_in_memory(path_run.model), IDS), **EXACT)
    base = AutoModelForCausalLM.from_pretrained(path_run.model_dir)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    down = (m.model.layers[0].mlp.down_proj.weight for m in (merged, base))
    assert not torch.equal(*down)


def test_merge_streaming_keeps_a_bf16_source_bf16(path_run, tmp_path):
    bf16_dir, out = tmp_path / "bf16", tmp_path / "out"
    build_model(str(path_run.model_dir)).to(torch.bfloat16).save_pretrained(bf16_dir)
    out.mkdir()
    merge_streaming(bf16_dir, path_run.checkpoint, out)
    assert next(AutoModelForCausalLM.from_pretrained(out).parameters()).dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_close(logits(merged, IDS), logits(path_run.model, IDS), atol=0.1, rtol=0.05)  # bf16 weights


def test_slora_checkpoint_exports_as_dense_lora(tmp_path):
    model = parallelize(tiny_model(), sharding="slora")
    run = write_run(tmp_path / "run", adapted(model), ModelConfig())
    export(run.run_dir, "peft-lora", tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "lora").eval()
    assert_close(logits(peft_model, IDS), logits(model, IDS), **ATOL)
    export(run.run_dir, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(merged, IDS), logits(model, IDS), **MERGED_TOL)


# --- generation -----------------------------------------------------------------------------------


def test_generate_is_greedy_decoding_of_base_plus_adapter(preset_run, capsys):
    ids = ByteTokenizer().encode("Q: copy abc\nA: ")  # the embedded dataset's template
    expected = ByteTokenizer().decode(greedy_reference(preset_run.model, ids, 12, eos=0))
    assert generate(preset_run.run_dir, "copy abc", max_new_tokens=12) == expected
    argv = ["generate", str(preset_run.run_dir), "--prompt", "copy abc", "--max-new-tokens", "12"]
    assert main(argv) == 0
    with_adapter = capsys.readouterr().out
    assert with_adapter.strip() and with_adapter.rstrip("\n") == expected.rstrip("\n")
    assert main([*argv, "--no-adapter"]) == 0
    assert capsys.readouterr().out != with_adapter


def test_greedy_decode_stops_before_eos(preset_run):
    ids = ByteTokenizer().encode("Q: copy abc\nA: ")
    free = greedy_reference(preset_run.model, ids, 8, eos=-1)  # no token stops it
    eos = free[3]
    assert greedy_decode(preset_run.model, ids, 8, eos_token_id=eos) == free[: free.index(eos)]


def test_generate_raw_skips_the_template(preset_run):
    ids = ByteTokenizer().encode("copy abc")
    expected = ByteTokenizer().decode(greedy_reference(preset_run.model, ids, 8, eos=0))
    assert generate(preset_run.run_dir, "copy abc", max_new_tokens=8, raw=True) == expected


def test_generate_with_the_runs_hf_tokenizer(path_run):
    ids = [2, 4, 3]  # "Q: hello\nA: " in the word-level vocabulary
    expected = greedy_reference(path_run.model, ids, 10, eos=1)
    assert greedy_decode(path_run.model, ids, 10, eos_token_id=1) == expected
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path_run.tokenizer_dir)
    assert generate(path_run.run_dir, "hello", max_new_tokens=10) == tokenizer.decode(expected)


# --- errors and atomicity -------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_missing_path_exits_2(tmp_path, capsys):
    code, err = run_cli(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no such run or checkpoint" in err


def test_run_without_a_complete_checkpoint_exits_2(tmp_path, capsys):
    partial = tmp_path / "run" / "checkpoints" / step_dir_name(4)
    partial.mkdir(parents=True)
    (partial / STATE).write_text("{}")
    code, err = run_cli(capsys, "generate", str(tmp_path / "run"), "--prompt", "x")
    assert code == 2 and f"{partial}: no {COMPLETE} marker" in err  # a published step lacks it
    code, err = run_cli(capsys, "export", str(partial), "--out", str(tmp_path / "o"))
    assert code == 2 and "incomplete checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_unknown_format_exits_2(preset_run, tmp_path, capsys):
    argv = ["export", str(preset_run.run_dir), "--format", "gguf", "--out", str(tmp_path / "o")]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "unknown format 'gguf'" in err and "merged" in err


def test_force_replaces_only_an_earlier_export(preset_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("old")
    for force in ([], ["--force"]):  # a directory bdlora export did not write is never replaced
        code, err = run_cli(capsys, "export", str(preset_run.run_dir), "--out", str(foreign), *force)
        assert code == 2 and "not empty" in err and "keep.txt" in err
    assert (foreign / "keep.txt").read_text() == "old"
    out = tmp_path / "out"
    assert main(["export", str(preset_run.run_dir), "--out", str(out)]) == 0
    code, err = run_cli(capsys, "export", str(preset_run.run_dir), "--out", str(out))
    assert code == 2 and "--force" in err
    assert main(["export", str(preset_run.run_dir), "--out", str(out), "--force"]) == 0
    expected = ["adapter_config.json", "adapter_model.safetensors", MARKER]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no staging left behind


def test_out_may_not_replace_the_run(preset_run, capsys):
    argv = ["export", str(preset_run.run_dir), "--out", str(preset_run.run_dir), "--force"]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "which the export reads" in err
    assert (preset_run.checkpoint / COMPLETE).is_file()


def test_interrupted_export_leaves_nothing_under_out(preset_run, tmp_path, monkeypatch):
    def fail_midway(model, directory, format):
        (Path(directory) / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "save_adapter", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        export(preset_run.run_dir, "peft-lora", tmp_path / "sub" / "out")
    assert list((tmp_path / "sub").iterdir()) == []


def test_adapter_of_another_architecture_is_refused(preset_run, path_run, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="a different base model"):
        merge_streaming(path_run.model_dir, preset_run.checkpoint, tmp_path / "out")


# --- end to end: a TP 2 training run, exported and run at TP 1 ------------------------------------


@pytest.mark.slow
def test_tp2_training_run_exports_and_generates_at_tp1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["parallel=tp2", "steps=4", "checkpoint.every=2", f"run_dir={run_dir}"]
    overrides += ["logger.progress=false", "data.num_examples=200", "data.seq_len=64"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*launch, "-m", "bdlora.train", *overrides], cwd=tmp_path, env=env, check=True, timeout=120
    )
    assert main(["export", str(run_dir), "--format", "peft-lora", "--out", str(tmp_path / "lora")]) == 0
    # the trainer's own final export was gathered over TP 2; the TP 1 export must match its logits
    reference = logits(load_adapter(tiny_model(), run_dir / "adapter"), IDS)
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "lora").eval()
    assert_close(logits(peft_model, IDS), reference, **ATOL)
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "copy abc", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip("\n")
