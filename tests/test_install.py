"""A non-editable install: the wheel ships the Hydra configs, and ``bdlora-train`` runs from a
directory outside the repository, importing bdlora (and its configs) only from the install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "bdlora" / "conf"
BUILD_TIMEOUT = 300
RUN_TIMEOUT = 300

# Runs in the installed interpreter: checks where bdlora and its configs come from, then runs the
# installed console script in the same process, so the check covers the run itself.
RUN_INSTALLED = """
import importlib.resources, runpy, sys
from pathlib import Path
import bdlora
site = Path(sys.argv[1]).resolve()
conf = Path(str(importlib.resources.files("bdlora.conf")))
origins = {"bdlora": Path(bdlora.__file__), "bdlora.conf": conf}
print("\\n".join(f"{name} from {path}" for name, path in origins.items()), flush=True)
for name, path in origins.items():
    assert path.resolve().is_relative_to(site), f"{name} imported from {path}, not from {site}"
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built offline from a copy of the sources (the build writes ``build/`` in its source)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "bdlora", src / "bdlora", ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = _run([*pip_wheel, "-w", str(dist), str(src)], BUILD_TIMEOUT)
    assert result.returncode == 0, _output(result)
    (built,) = dist.glob("bdlora-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_every_conf_yaml(wheel):
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("bdlora/conf/")}
    expected = {f"bdlora/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}

    assert any("/" in p.removeprefix("bdlora/conf/") for p in expected), "no nested config group found"
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert "bdlora/conf/__init__.py" in shipped


@pytest.mark.slow
def test_installed_wheel_trains_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)]
    result = _run(cmd, BUILD_TIMEOUT)
    assert result.returncode == 0, _output(result)
    script = site / "bin" / "bdlora-train"
    assert script.is_file(), f"no console script in {site / 'bin'}"
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(REPO), "the run must start outside the repository"
    run_dir = tmp_path / "run"
    overrides = ["steps=2", "eval_every=0", "data.num_examples=200", "data.seq_len=32"]
    overrides += ["logger.progress=false", f"run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    cmd = [sys.executable, "-c", RUN_INSTALLED, str(site), str(script), *overrides]
    result = _run(cmd, RUN_TIMEOUT, cwd=cwd, env=env)

    assert result.returncode == 0, _output(result)
    assert f"bdlora from {site / 'bdlora' / '__init__.py'}" in result.stdout, _output(result)
    assert (run_dir / "adapter" / "adapter_config.json").is_file(), _output(result)
