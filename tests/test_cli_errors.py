"""Mistakes users make on the command line end in one ``<prog>: error: ...`` line and exit code 2:
a broken YAML file, a bad override, a run directory that is a file, a pointless ``generate``; and a
start refused by a setting leaves no new directory behind (a multirun job leaves its message).

Every check runs the real command (``bdlora``, ``python -m bdlora.train``) in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_train import train

pytestmark = pytest.mark.slow  # every test starts a bdlora command in a subprocess

TINY = ["eval_every=0", "data.num_examples=200", "data.seq_len=32", "logger.progress=false"]
MALFORMED_YAML = b"# @package _global_\nsteps: 2\n  eval_every: [1\n"  # line 3: an indented key
NOT_UTF8_YAML = b"# @package _global_\nsteps: 2\nrun_name: caf\xe9\n"  # line 3: latin-1 e-acute


def bdlora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("bdlora")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "bdlora.cli"]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def error_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a refused command, after checking that it is the only one."""
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error")]
    assert len(errors) == 1, result.stderr
    for noise in ("Traceback", "full_key", "HYDRA_FULL_ERROR", "\tdemo"):
        assert noise not in result.stderr, result.stderr
    return errors[0]


# --- bdlora plan --config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (MALFORMED_YAML, "bad.yaml, line 3, column 13: invalid YAML: mapping values are not allowed here"),
        (NOT_UTF8_YAML, "bad.yaml, line 3, column 14: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ],
)
def test_plan_names_the_file_and_line_of_a_broken_yaml(tmp_path, content, expected):
    (tmp_path / "bad.yaml").write_bytes(content)
    line = error_line(bdlora("plan", "--config", "bad.yaml", cwd=tmp_path), "bdlora plan")
    assert line == f"bdlora plan: error: {expected}"


def test_plan_says_a_directory_is_no_adapter_directory(tmp_path):
    (tmp_path / "configs").mkdir()
    line = error_line(bdlora("plan", "--config", "configs", cwd=tmp_path), "bdlora plan")
    assert "'configs' is a directory without adapter_config.json" in line
    assert "no such file" not in line


# --- bdlora-train: Hydra's own failures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (MALFORMED_YAML, "bad.yaml, line 3, column 13: invalid YAML: mapping values are not allowed here"),
        (NOT_UTF8_YAML, "bad.yaml, line 3, column 14: not UTF-8 text (byte 0xe9)"),
    ],
)
def test_trainer_names_the_file_and_line_of_a_broken_experiment(tmp_path, content, expected):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "bad.yaml").write_bytes(content)
    result = train(1, "--config-dir", "conf", "experiment=bad", cwd=tmp_path)
    line = error_line(result, "bdlora-train")
    assert line.startswith(f"bdlora-train: error: {tmp_path.resolve() / 'conf' / 'experiment'}")
    assert expected in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["parallel.sharding=foo"],
            "parallel.sharding=foo: Invalid value 'foo', expected one of [bdlora, slora, replicated]",
        ),
        (
            ["-m", "parallel.sharding=bdlora,foo"],  # a multirun refuses before its first job
            "parallel.sharding=foo: Invalid value 'foo', expected one of [bdlora, slora, replicated]",
        ),
        (["optim.lrr=1"], "unknown config key 'optim.lrr': valid keys under 'optim': lr, weight_decay,"),
        (
            ["adapter.groups.attn.rnk=4"],
            "unknown config key 'adapter.groups.attn.rnk': valid keys under 'adapter.groups.attn': modules,",
        ),
        (["experiment=nope"], "Could not find 'experiment/nope'; available: demo, rank_sweep, smollm2"),
    ],
)
def test_bad_overrides_end_in_one_line_naming_the_key_and_the_valid_values(tmp_path, overrides, expected):
    result = train(1, *overrides, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert expected in error_line(result, "bdlora-train")
    run = tmp_path / "run"
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert left == (["multirun.yaml"] if "-m" in overrides else [])  # Hydra's record of the sweep


@pytest.mark.parametrize("where", ["afile", "afile/run"])
def test_a_run_dir_that_is_a_file_ends_in_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("not a directory\n")
    line = error_line(train(1, *TINY, f"run_dir={tmp_path / where}", cwd=tmp_path), "bdlora-train")
    assert f"cannot create the run directory {tmp_path / where}: " in line
    assert "run_dir= (hydra.run.dir=, hydra.sweep.dir= in a multirun) must name a directory" in line


def test_bdlora_traceback_shows_hydras_error(tmp_path):
    result = train(1, "parallel.sharding=foo", cwd=tmp_path, env={"BDLORA_TRACEBACK": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigCompositionException" in result.stderr


# --- bdlora generate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens -3: give a positive number"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: give a positive number"),
        (["--prompt", ""], "--prompt '' is empty: give the text to continue"),
    ],
)
def test_generate_refuses_nothing_to_generate(tmp_path, options, expected):
    line = error_line(bdlora("generate", "no-such-run", *options, cwd=tmp_path), "bdlora generate")
    assert line.startswith(f"bdlora generate: error: {expected}")


# --- what a refused start leaves ----------------------------------------------------------------------


def test_a_start_refused_by_a_setting_leaves_no_new_run_directory(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    result = train(1, *TINY, "steps=0", f"run_dir={run_dir}", cwd=tmp_path)
    assert error_line(result, "bdlora-train") == "bdlora-train: error: steps=0: must be >= 1"
    assert not run_dir.exists()


def test_a_refused_start_keeps_a_directory_that_existed(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    result = train(1, *TINY, "steps=0", f"run_dir={run_dir}", cwd=tmp_path)
    assert error_line(result, "bdlora-train") == "bdlora-train: error: steps=0: must be >= 1"
    assert run_dir.is_dir() and not any(run_dir.iterdir())


def test_a_multirun_job_refused_by_a_setting_leaves_its_message_for_the_sweep_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = train(1, "-m", *TINY, "steps=2,-3", f"run_dir={sweep}", cwd=tmp_path)
    assert error_line(result, "bdlora-train") == "bdlora-train: error: steps=-3: must be >= 1"
    assert (sweep / "1" / "error.txt").read_text() == "TrainConfigError: steps=-3: must be >= 1\n"
    report = bdlora("sweep-report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert "1 finished, 1 failed." in text
    assert "| 0 | steps=2 |" in text  # only the override that differs between the jobs
    assert "| 1 | steps=-3 | TrainConfigError: steps=-3: must be >= 1 |" in text


def test_sweep_report_shows_only_overrides_that_differ_when_a_job_left_none(tmp_path):
    """A job killed before it wrote its overrides does not make the shared ones look varied."""
    sweep = tmp_path / "sweep"
    for job, rank in enumerate((4, 8)):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        overrides = ["steps=2", f"adapter.rank={rank}", "logger.progress=False"]
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        summary = {"final": {"loss": 1.0}, "eval": {"eval_loss": 1.0}, "adapter_params": 100 * rank}
        (sweep / str(job) / "summary.json").write_text(json.dumps(summary))
    (sweep / "2").mkdir()  # killed at start
    report = bdlora("sweep-report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| 0 | adapter.rank=4 |" in report.stdout and "| 1 | adapter.rank=8 |" in report.stdout
