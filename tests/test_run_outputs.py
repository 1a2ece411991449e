"""What a run leaves for its user, used as a user would: ``bdlora export`` as a command (where
``--out`` may point, what ``--force`` may replace, a merged preset's tokenizer), and the trainer's
``metrics.jsonl``, ``summary.json`` and closing lines across restarts and resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from bdlora.train.checkpoint import step_dir_name
from bdlora.train.config import ModelConfig
from bdlora.train.data import ByteTokenizer
from bdlora.train.export import MARKER
from tests.conftest import tiny_model
from tests.test_export import Run, adapted, write_run
from tests.test_train import (
    RUN_TIMEOUT,
    output_of,
    read_metrics,
    train,
    train_command,
    train_env,
    wait_for_step,
)

pytestmark = pytest.mark.slow  # every test starts a bdlora command in a subprocess

BDLORA = str(Path(sys.executable).with_name("bdlora"))  # the console script beside this Python
TEXTS = ["Q: copy abc\nA: ", "héllo wörld ☃ 日本 🙂", "  tabs\tand\nnewlines  ", "a literal </s> stays bytes"]


def bdlora(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BDLORA, *argv], cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory) -> Run:
    """A run on the tiny-llama preset with the default (byte) tokenizer and a nonzero adapter."""
    cfg = ModelConfig(source="preset", name="tiny-llama", seed=2)
    return write_run(tmp_path_factory.mktemp("preset_run"), adapted(tiny_model("tiny-llama", seed=2)), cfg)


# --- bdlora export: --out and --force -------------------------------------------------------------


@pytest.mark.parametrize("out", [".", ".."])
def test_export_into_the_current_directory_is_one_error_that_changes_nothing(preset_run, tmp_path, out):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")

    result = bdlora("export", str(preset_run.run_dir), "--out", out, "--force", cwd=cwd)

    assert result.returncode == 2, output_of(result)
    assert result.stderr.count("\n") == 1 and "current directory" in result.stderr, result.stderr
    assert listing(cwd) == ["notes.txt"] and listing(tmp_path) == ["work"]  # no .old-* / .partial-*


def test_force_refuses_a_directory_no_export_wrote_and_says_what_it_holds(preset_run, tmp_path):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")

    result = bdlora("export", str(preset_run.run_dir), "--out", str(out), "--force", cwd=tmp_path)

    assert result.returncode == 2, output_of(result)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "notes.txt" in result.stderr and "src/" in result.stderr and MARKER in result.stderr
    assert listing(out) == ["notes.txt", "src"] and listing(tmp_path) == ["project"]


def test_force_replaces_an_earlier_export(preset_run, tmp_path):
    out = tmp_path / "exported"
    run = str(preset_run.run_dir)
    first = bdlora("export", run, "--format", "peft-lora", "--out", "exported", cwd=tmp_path)
    assert first.returncode == 0, output_of(first)
    again = bdlora("export", run, "--out", "exported", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr, output_of(again)

    result = bdlora("export", run, "--out", "exported", "--force", cwd=tmp_path)

    assert result.returncode == 0, output_of(result)
    record = json.loads((out / MARKER).read_text())
    assert record["format"] == "peft-bdlora" and record["step"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["use_bdlora"]  # the new export
    assert listing(tmp_path) == ["exported"]


# --- bdlora export --format merged: the run's tokenizer ------------------------------------------


def test_merged_preset_export_holds_the_byte_tokenizer_autotokenizer_loads(preset_run, tmp_path):
    result = bdlora("export", str(preset_run.run_dir), "--format", "merged", "--out", "merged", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert "tokenizer: UTF-8 bytes" in result.stdout, result.stdout

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")

    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == ByteTokenizer().encode(text), text
        assert tokenizer.decode([*ids, 0], skip_special_tokens=True) == text
    assert tokenizer.eos_token_id == ByteTokenizer.eos_token_id
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    assert config.eos_token_id == ByteTokenizer.eos_token_id  # generate() stops where training did


# --- the trainer: metrics.jsonl, summary.json and the closing lines -------------------------------

TRAIN_ARGS = [
    "experiment=demo",
    "parallel.tp=1",
    "data.num_examples=100",
    "data.seq_len=32",
    "logger.progress=false",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-process run of 4 steps: evals at steps 0, 2, 4, checkpoints at 2 and 4."""
    cwd = tmp_path_factory.mktemp("finished")
    args = ["steps=4", "eval_every=2", "checkpoint.every=2", "checkpoint.keep_last=0"]
    result = train(1, *TRAIN_ARGS, *args, "run_dir=run", cwd=cwd)
    assert result.returncode == 0, output_of(result)
    return cwd / "run"


def test_summary_json_holds_each_metric_once(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    last = read_metrics(finished_run)[-1]

    assert summary["eval"] == {k: last[k] for k in ("eval_loss", "eval_ppl")}
    assert summary["final"] == {k: v for k, v in last.items() if k not in ("step", "eval_loss", "eval_ppl")}
    assert (summary["first_step"], summary["final"]["loss"]) == (1, last["loss"])


def test_resumed_run_says_its_train_loss_covers_this_session_only(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / step_dir_name(4))  # as if it had stopped after step 2
    args = ["steps=4", "eval_every=2", "checkpoint.every=2", "checkpoint.resume=auto"]

    result = train(1, *TRAIN_ARGS, *args, "run_dir=run", cwd=tmp_path)

    assert result.returncode == 0, output_of(result)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("train loss")]
    assert line.endswith("(steps 3-4, this session)"), line
    assert json.loads((run_dir / "summary.json").read_text())["first_step"] == 3


def test_restart_after_ctrl_c_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TRAIN_ARGS, "eval_every=2", "checkpoint.every=1000"]  # step 0 is the base model's eval
    # Ctrl-C's default action, as in a terminal: a shell without job control (CI's) starts background
    # commands with SIGINT ignored, which exec keeps; a handled signal is reset to its default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with (tmp_path / "interrupted.log").open("w") as log:
        try:
            proc = subprocess.Popen(
                train_command(1, *args, "steps=100000", f"run_dir={run_dir}"),
                cwd=tmp_path,
                env=train_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal's foreground job
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            seen = wait_for_step(proc, run_dir / "metrics.jsonl", 1, timeout=RUN_TIMEOUT)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not stop the run:\n" + (tmp_path / "interrupted.log").read_text()[-3000:])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert seen >= 1 and proc.returncode != 0, (tmp_path / "interrupted.log").read_text()
    assert not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir())

    result = train(1, *args, "steps=4", "checkpoint.resume=auto", f"run_dir={run_dir}", cwd=tmp_path)

    assert result.returncode == 0, output_of(result)
    assert "no complete checkpoint" in result.stdout and "starting at step 0" in result.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4], records
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]


# --- DeepSpeed: the environment's prebuilt op, whatever starts the run ----------------------------


@pytest.mark.skipif(
    not (Path(sys.prefix) / "torch_extensions").is_dir(),
    reason="no prebuilt DeepSpeed op in this environment (make setup builds it)",
)
def test_deepspeed_run_without_a_launcher_uses_the_prebuilt_op(tmp_path):
    # torch's default build root (XDG_CACHE_HOME/torch_extensions) is empty: a run that misses the
    # environment's op compiles it there
    env = {k: v for k, v in train_env().items() if k != "TORCH_EXTENSIONS_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    args = ["parallel.engine=deepspeed", "deepspeed=zero1", "steps=2", "run_dir=run"]

    result = subprocess.run(
        train_command(1, *TRAIN_ARGS, *args),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )

    assert result.returncode == 0, output_of(result)
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 2
    assert not (tmp_path / "cache" / "torch_extensions").exists(), "the op was compiled again"
