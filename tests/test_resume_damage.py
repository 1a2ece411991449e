"""Resume that survives damage: every checkpoint carries a manifest of its files, a damaged one is
skipped (``resume=auto``, ``bdlora export RUN``) or refused (named explicitly), a torn metrics line
is dropped, and nothing read back from a checkpoint is unpickled.

The subprocess tests run the real CLI on copies of one undamaged run per process count.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from bdlora import load_adapter
from bdlora.train.checkpoint import (
    COMPLETE,
    MANIFEST,
    STATE,
    CheckpointDamaged,
    _load_rng_state,
    _save_rng_state,
    newest_intact,
    step_dir_name,
    verify_checkpoint,
    write_manifest,
)
from tests.conftest import tiny_model
from tests.test_train import adapter_state, by_step, output_of, read_metrics, train, train_env

STEPS, EVERY = 8, 4
NEWEST, PREVIOUS = step_dir_name(STEPS), step_dir_name(STEPS - EVERY)
ARGS = [
    "experiment=demo",
    f"steps={STEPS}",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep_last=0",
    "eval_every=0",
    "data.num_examples=400",
    "data.seq_len=64",
    "logger.progress=false",
]
SHARD = "adapter-tp000-of-001.safetensors"


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: safetensors would still load it
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- the manifest, no process group --------------------------------------------------------------


def small_checkpoint(directory: Path) -> Path:
    """A checkpoint directory laid out as the trainer publishes it: files, manifest, COMPLETE."""
    directory.mkdir(parents=True)
    save_file({"lora_A": torch.arange(12.0).reshape(3, 4)}, directory / SHARD)
    (directory / STATE).write_text(json.dumps({"step": 4}))
    write_manifest(directory)
    (directory / COMPLETE).write_text("4")
    return directory


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    ckpt = small_checkpoint(tmp_path / "ckpt")

    verify_checkpoint(ckpt)

    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted([SHARD, STATE])
    data = (ckpt / SHARD).read_bytes()
    assert files[SHARD] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_pickle(directory: Path) -> None:
    (directory / "rng-rank00000.pt").write_bytes(pickle.dumps({"torch": None}))


DAMAGE = [
    pytest.param(lambda d: flip_last_byte(d / SHARD), [SHARD, "checksum differs"], id="flipped-byte"),
    pytest.param(write_pickle, ["rng-rank00000.pt", f"not in {MANIFEST}"], id="extra-file"),
    pytest.param(lambda d: cut_in_half(d / SHARD), [SHARD, "size differs", "expected"], id="truncated"),
    pytest.param(lambda d: (d / SHARD).unlink(), [f"{SHARD}: missing"], id="missing"),
    pytest.param(lambda d: (d / MANIFEST).unlink(), [f"no {MANIFEST}"], id="no-manifest"),
    pytest.param(lambda d: (d / MANIFEST).write_text("{"), [f"{MANIFEST} is not a valid"], id="bad-manifest"),
    pytest.param(lambda d: (d / COMPLETE).unlink(), [f"no {COMPLETE}"], id="no-complete"),
]


@pytest.mark.parametrize(("damage", "words"), DAMAGE)
def test_damage_is_refused_naming_the_file_and_why(tmp_path, damage: Callable[[Path], None], words):
    ckpt = small_checkpoint(tmp_path / "ckpt")
    damage(ckpt)

    with pytest.raises(CheckpointDamaged) as info:
        verify_checkpoint(ckpt)

    assert str(ckpt) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_newest_intact_falls_back_and_fails_when_none_verifies(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    older, newer = (small_checkpoint(root / step_dir_name(s)) for s in (4, 8))
    flip_last_byte(newer / SHARD)
    heard: list[str] = []

    assert newest_intact(root, heard.append) == older
    assert f"{newer}: {SHARD}: checksum differs" in heard[0]
    assert heard[1].startswith(f"falling back to {older.name}")

    (newer / COMPLETE).unlink()  # a published step without its marker is damage, not absence
    heard.clear()
    assert newest_intact(root, heard.append) == older
    assert f"{newer}: no {COMPLETE} marker" in heard[0]
    assert heard[1].startswith(f"falling back to {older.name}")

    cut_in_half(older / SHARD)
    with pytest.raises(CheckpointDamaged) as info:
        newest_intact(root, heard.append)
    assert f"run {tmp_path / 'run'}" in str(info.value) and f"no {COMPLETE} marker" in str(info.value)
    assert newest_intact(tmp_path / "nothing", heard.append) is None


def test_rng_state_round_trips_through_safetensors(tmp_path):
    path = tmp_path / "rng-rank00000.safetensors"
    _save_rng_state(path)
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()

    _load_rng_state(path)

    assert_close(torch.rand(3), expected[0], atol=0, rtol=0)
    assert random.random() == expected[1]


# --- the real CLI on damaged copies of a run -----------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Callable[[int], Path]:
    """The run directory of an undamaged run on ``nproc`` processes (TP ``nproc``), trained once."""
    runs: dict[int, Path] = {}

    def run_dir(nproc: int) -> Path:
        if nproc not in runs:
            cwd = tmp_path_factory.mktemp(f"reference{nproc}")
            result = train(nproc, *ARGS, f"parallel.tp={nproc}", f"run_dir={cwd / 'run'}", cwd=cwd)
            assert result.returncode == 0, output_of(result)
            runs[nproc] = cwd / "run"
        return runs[nproc]

    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def resume(nproc: int, run_dir: Path, resume_from: str = "auto") -> subprocess.CompletedProcess:
    overrides = [f"parallel.tp={nproc}", f"run_dir={run_dir}", f"checkpoint.resume={resume_from}"]
    return train(nproc, *ARGS, *overrides, cwd=run_dir.parent)


def losses_after(run_dir: Path, step: int) -> dict[int, float]:
    return {s: loss for s, loss in by_step(read_metrics(run_dir)).items() if s > step}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_skips_a_damaged_checkpoint_and_reproduces_the_losses(reference, nproc, tmp_path):
    run_dir = copy_of(reference(nproc), tmp_path)
    shard = f"adapter-tp{nproc - 1:03d}-of-{nproc:03d}.safetensors"  # the last TP rank's
    cut_in_half(run_dir / "checkpoints" / NEWEST / shard)

    result = resume(nproc, run_dir)

    assert result.returncode == 0, output_of(result)
    assert f"{NEWEST}: {shard}: size differs" in result.stdout
    assert f"falling back to {PREVIOUS}" in result.stdout
    assert f"resumed from {run_dir / 'checkpoints' / PREVIOUS} at step {STEPS - EVERY}" in result.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    got, expected = losses_after(run_dir, STEPS - EVERY), losses_after(reference(nproc), STEPS - EVERY)
    assert got.keys() == expected.keys() and got
    assert_close(torch.tensor(list(got.values())), torch.tensor(list(expected.values())), atol=1e-6, rtol=0)
    verify_checkpoint(run_dir / "checkpoints" / NEWEST)  # saved again, whole


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_with_a_warning(reference, tmp_path):
    run_dir = copy_of(reference(1), tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / NEWEST)  # interrupted while writing step 8's record
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    last = text.splitlines()[-1]
    metrics.write_text(text[: len(text) - len(last) // 2 - 1])  # half of it, no newline

    result = resume(1, run_dir)

    assert result.returncode == 0, output_of(result)
    assert "metrics.jsonl: dropped line(s) [8]" in result.stderr
    assert metrics.read_text().endswith("}\n")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    got, expected = by_step(records), by_step(read_metrics(reference(1)))
    assert_close(torch.tensor(list(got.values())), torch.tensor(list(expected.values())), atol=1e-6, rtol=0)


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a loader ran a pickle it was given."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.slow
def test_a_pickle_dropped_into_a_checkpoint_is_never_loaded(reference, tmp_path):
    run_dir = copy_of(reference(1), tmp_path)
    newest, marker = run_dir / "checkpoints" / NEWEST, tmp_path / "unpickled"
    (newest / "rng-rank00000.pt").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))

    named = resume(1, run_dir, resume_from=str(newest))
    assert not marker.exists(), "the named checkpoint's pickle was unpickled"
    assert named.returncode != 0
    assert f"rng-rank00000.pt: not in {MANIFEST}" in output_of(named)

    auto = resume(1, run_dir)
    assert not marker.exists(), "resume=auto unpickled the newest checkpoint's pickle"
    assert auto.returncode == 0, output_of(auto)
    assert f"{NEWEST}: rng-rank00000.pt: not in {MANIFEST}" in auto.stdout
    assert f"at step {STEPS - EVERY}" in auto.stdout


def bdlora(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bdlora.cli", *argv]
    return subprocess.run(
        command, cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_export_skips_a_damaged_checkpoint_and_refuses_one_named(reference, tmp_path):
    run_dir = copy_of(reference(1), tmp_path)
    damaged, previous = run_dir / "checkpoints" / NEWEST, run_dir / "checkpoints" / PREVIOUS
    flip_last_byte(damaged / SHARD)

    result = bdlora("export", str(run_dir), "--format", "peft-bdlora", "--out", "out", cwd=tmp_path)

    assert result.returncode == 0, output_of(result)
    assert f"{damaged}: {SHARD}: checksum differs" in result.stderr
    assert f"falling back to {PREVIOUS}" in result.stderr
    assert f"exported {previous} (step {STEPS - EVERY})" in result.stdout
    exported = load_adapter(tiny_model(), tmp_path / "out")
    expected = adapter_state(previous)
    for name, value in expected.items():
        assert_close(exported.get_parameter(name), value, atol=0, rtol=0)

    for command in (["export", str(damaged), "--out", "out2"], ["generate", str(damaged), "--prompt", "x"]):
        refused = bdlora(*command, cwd=tmp_path)
        assert refused.returncode == 2, output_of(refused)
        assert f"bdlora {command[0]}: error: {damaged}: {SHARD}: checksum differs" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "out2").exists()
