"""``launch/torchrun.sh`` and ``launch/deepspeed.sh`` run where the user stands: started from another
directory, relative ``run_dir``, ``data.source``, ``--config-dir`` and ``deepspeed.config_file`` and
Hydra's default ``outputs/`` resolve there, and nothing lands in the repository.

Each run gets a name of its own, so a launcher that wrongly writes into the repository is caught
and its output removed again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.test_train import output_of, read_metrics, train_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["steps=2", "eval_every=0", "logger.progress=false", "checkpoint.every=0"]

pytestmark = pytest.mark.slow


def launch(
    script: str, args: list[str], cwd: Path, nproc: int, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """``bash <repo>/launch/<script> args`` in ``cwd``, with this environment's tools first on PATH;
    ``env`` adds variables (None removes one)."""
    full_env = {**train_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    full_env.update(NPROC=str(nproc), PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args],
        cwd=cwd,
        env={k: v for k, v in full_env.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def fresh_name() -> str:
    return f"cwd-test-{uuid.uuid4().hex[:8]}"


def in_repo(relative: str) -> bool:
    """Whether ``relative`` exists under the repository; removed if it does."""
    path = ROOT / relative
    found = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    return found


def test_torchrun_sh_resolves_relative_paths_in_the_callers_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(64))
    )
    experiment = tmp_path / "my_conf" / "experiment" / "tiny.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text(
        "# @package _global_\nrun_name: tiny\ndata:\n  seq_len: 16\n  micro_batch_size: 2\n"
    )
    name = fresh_name()
    args = ["--config-dir", "my_conf", "experiment=tiny", "data=jsonl", "data.source=train.jsonl"]
    result = launch("torchrun.sh", [*args, *TINY, "parallel.tp=2", f"run_dir={name}/run"], tmp_path, 2)

    wrote_into_repo = in_repo(name)
    assert result.returncode == 0, output_of(result)
    assert not wrote_into_repo
    run_dir = tmp_path / name / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "run_name: tiny" in config and "source: train.jsonl" in config


def test_torchrun_sh_writes_hydras_default_outputs_in_the_callers_directory(tmp_path):
    name = fresh_name()
    args = ["experiment=demo", "parallel.tp=1", "data.num_examples=100", "data.seq_len=16", *TINY]
    result = launch("torchrun.sh", [*args, f"run_name={name}"], tmp_path, 1)

    wrote_into_repo = in_repo(f"outputs/{name}")
    assert result.returncode == 0, output_of(result)
    assert not wrote_into_repo
    (run_dir,) = (tmp_path / "outputs" / name).iterdir()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_deepspeed_sh_resolves_relative_paths_and_finds_the_prebuilt_op(tmp_path):
    (tmp_path / "ds.yaml").write_text("zero_optimization:\n  stage: 2\n")
    name = fresh_name()
    args = ["deepspeed=zero2", "deepspeed.config_file=ds.yaml", "data.num_examples=100", "data.seq_len=16"]
    # the op's default cache (XDG_CACHE_HOME) is empty: a launcher that misses the environment's
    # prebuilt op compiles it there
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "TORCH_EXTENSIONS_DIR": None}
    result = launch("deepspeed.sh", [*args, *TINY, f"run_dir={name}/run"], tmp_path, 1, env)

    wrote_into_repo = in_repo(name)
    assert result.returncode == 0, output_of(result)
    assert not wrote_into_repo
    run_dir = tmp_path / name / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert "config_file: ds.yaml" in (run_dir / ".hydra" / "config.yaml").read_text()
    if (Path(sys.prefix) / "torch_extensions").is_dir():
        assert not (tmp_path / "cache" / "torch_extensions").exists(), "the prebuilt op was not found"
