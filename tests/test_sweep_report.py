"""``bdlora sweep-report``: a synthetic multirun directory in the files ``bdlora-train -m`` writes
(finished, failed, killed jobs and a torn metrics line), read back as a table, a CSV and a plot whose
markers are found in the saved image; and one real two-job sweep (slow)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml

from bdlora.cli import main as cli_main
from bdlora.train.sweep_report import UNFINISHED, write_sweep_report

RANK = "adapter.groups.attn.rank"
OOM = "RuntimeError: CUDA out of memory | tried to allocate 2.00 GiB"


def write_job(sweep: Path, job: int, rank: int, *, params=None, metrics=(), summary=None, error=None):
    """One job directory as ``bdlora-train`` leaves it; ``metrics`` items that are strings are written
    as they are (torn or non-object lines)."""
    job_dir = sweep / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    overrides = ["experiment=demo", "steps=3", f"{RANK}={rank}", "logger.progress=False"]
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if params is not None:
        plan = {"params": params, "lora_params": params + 4096, "nblocks": 2, "modules": {}}
        (job_dir / "plan.json").write_text(json.dumps(plan))
    lines = [m if isinstance(m, str) else json.dumps(m) for m in metrics]
    (job_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))
    if error is not None:
        (job_dir / "error.txt").write_text(error + "\n")


def step(n: int, loss: float, tokens_per_s: float, **extra) -> dict:
    return {"step": n, "loss": loss, "tokens_per_s": tokens_per_s, "step_time": 0.05, **extra}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Jobs 1, 0, 2 in adapter-size order with eval losses 6.70, 6.7123..., 6.60 (not monotone in size);
    job 3 failed, job 4 was killed; job 2 has no plan.json, no eval in its summary and a torn line."""
    sweep = tmp_path / "multirun" / "demo" / "20260101-000000-abc123"
    (sweep / ".submitit" / "123").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    metrics0 = [
        {"step": 0, "eval_loss": 7.0, "eval_ppl": 1096.6},
        step(1, 7.0, 1000.0, tp_collectives=30, tp_bytes=100, dp_collectives=2),
        step(2, 6.95, 3000.0, tp_collectives=24, tp_bytes=80),
        step(3, 6.9, 5000.0, tp_collectives=24, tp_bytes=80),
        step(4, 6.85, 4000.0, eval_loss=6.712345678901, eval_ppl=822.0),
    ]
    final0 = {"loss": 6.85, "eval_loss": 6.712345678901}
    summary0 = {"first_loss": 7.0, "final": final0, "eval": {"eval_loss": 6.712345678901}}
    write_job(sweep, 0, 8, params=12288, metrics=metrics0, summary={**summary0, "adapter_params": 12288})
    metrics1 = [step(1, 7.1, 2500.0, eval_loss=6.75)]  # summary.json's eval loss wins
    summary1 = {"first_loss": 7.1, "final": {"loss": 7.1}, "eval": {"eval_loss": 6.7}, "adapter_params": 9216}
    write_job(sweep, 1, 4, params=9216, metrics=metrics1, summary=summary1)
    metrics2 = [
        step(1, 7.0, 100.0, eval_loss=6.9),
        step(2, 6.55, 300.0, eval_loss=6.6),
        "null",
        '{"step": 3, "lo',
    ]
    summary2 = {"first_loss": 7.0, "final": {"loss": 6.55}, "eval": {}, "adapter_params": 18432}
    write_job(sweep, 2, 16, metrics=metrics2, summary=summary2)
    write_job(sweep, 3, 32, params=24576, metrics=[step(1, 7.0, 900.0)], error=OOM)
    write_job(sweep, 4, 64, params=36864, metrics=[step(1, 7.0, 800.0)])
    return sweep


def markdown_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading``, header and rule left out."""
    after = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), after[start:]))
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line[1:-1])] for line in table[2:]]


def red_clusters(png: Path) -> list[tuple[float, float, int]]:
    """(row, column, size) of each 4-connected cluster of pure-red pixels: the plot's markers."""
    image = mpimg.imread(png)
    mask = (image[..., 0] > 0.99) & (image[..., 1] < 0.01) & (image[..., 2] < 0.01)
    todo = {(int(r), int(c)) for r, c in np.argwhere(mask)}
    clusters = []
    while todo:
        stack, pixels = [todo.pop()], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for neighbour in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if neighbour in todo:
                    todo.remove(neighbour)
                    stack.append(neighbour)
        row, col = np.mean(pixels, axis=0)
        clusters.append((float(row), float(col), len(pixels)))
    return clusters


def test_rows_are_finished_jobs_by_adapter_size_with_final_metrics(sweep, tmp_path):
    report = write_sweep_report(sweep, tmp_path / "out")
    assert [r["job"] for r in report.rows] == [1, 0, 2]
    assert [r["adapter_params"] for r in report.rows] == [9216, 12288, 18432]  # job 2's from summary.json
    assert [r["overrides"] for r in report.rows] == [f"{RANK}=4", f"{RANK}=8", f"{RANK}=16"]
    assert [r["train_loss"] for r in report.rows] == [7.1, 6.85, 6.55]
    assert [r["eval_loss"] for r in report.rows] == [6.7, 6.712345678901, 6.6]  # job 2's from metrics
    assert [r["tokens_per_s"] for r in report.rows] == [2500.0, 4000.0, 300.0]  # first step left out
    assert [r["tp_collectives_per_step"] for r in report.rows] == [None, 24, None]
    assert [(f["job"], f["error"]) for f in report.failed] == [(3, OOM), (4, UNFINISHED)]


def test_overrides_show_all_settings_when_none_differ(tmp_path):
    sweep = tmp_path / "sweep"
    summary = {"first_loss": 7.0, "final": {"loss": 6.9}, "eval": {"eval_loss": 6.8}}
    write_job(sweep, 0, 4, params=9216, metrics=[step(1, 7.0, 10.0)], summary=summary)
    report = write_sweep_report(sweep)
    assert report.rows[0]["overrides"] == f"experiment=demo steps=3 {RANK}=4 logger.progress=False"
    assert report.markdown_path == sweep / "sweep_report.md" and report.markdown_path.is_file()


def test_markdown_table_rounds_and_lists_failed_runs_with_their_errors(sweep, tmp_path):
    report = write_sweep_report(sweep, tmp_path / "out")
    text = report.markdown_path.read_text()
    assert text == report.markdown
    table = markdown_rows(text, "# Sweep report")
    assert table == [
        ["1", f"{RANK}=4", "9216", "7.1000", "6.7000", "2500.0000", ""],
        ["0", f"{RANK}=8", "12288", "6.8500", "6.7123", "4000.0000", "24"],
        ["2", f"{RANK}=16", "18432", "6.5500", "6.6000", "300.0000", ""],
    ]
    failed = markdown_rows(text, "## Failed runs")
    assert failed == [["3", f"{RANK}=32", OOM.replace("|", "\\|")], ["4", f"{RANK}=64", UNFINISHED]]


def test_csv_has_every_job_with_status_error_and_full_precision(sweep, tmp_path):
    report = write_sweep_report(sweep, tmp_path / "out")
    with report.csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("1", "ok"),
        ("0", "ok"),
        ("2", "ok"),
        ("3", "failed"),
        ("4", "failed"),
    ]
    assert [r["error"] for r in rows] == ["", "", "", OOM, UNFINISHED]
    assert float(rows[1]["eval_loss"]) == 6.712345678901
    assert rows[1]["tp_collectives_per_step"] == "24" and rows[0]["tp_collectives_per_step"] == ""
    assert rows[3]["overrides"] == f"{RANK}=32" and rows[3]["adapter_params"] == "24576"


def test_plot_has_one_marker_per_run_placed_by_size_and_eval_loss(sweep, tmp_path):
    report = write_sweep_report(sweep, tmp_path / "out")
    image = mpimg.imread(report.png_path)
    assert image.shape[:2] == (500, 700)
    reddish = image[..., 0] - image[..., 1] > 0.1
    pure_red = (image[..., 0] > 0.99) & (image[..., 1] < 0.01) & (image[..., 2] < 0.01)
    assert not (reddish & ~pure_red).any()  # crisp markers: no blended edge pixels
    clusters = sorted(red_clusters(report.png_path), key=lambda c: c[1])  # left to right
    assert len(clusters) == len(report.rows) == 3
    assert all(50 <= size <= 200 for _, _, size in clusters), clusters  # whole markers, not specks
    params = [r["adapter_params"] for r in report.rows]
    losses = [r["eval_loss"] for r in report.rows]
    rows = [row for row, _, _ in clusters]
    assert np.argsort(rows).tolist() == np.argsort(losses)[::-1].tolist()  # higher loss, higher up
    cols = [col for _, col, _ in clusters]
    # linear axes: the markers' spacing follows the values
    x_share = (cols[1] - cols[0]) / (cols[2] - cols[0])
    assert x_share == pytest.approx((params[1] - params[0]) / (params[2] - params[0]), abs=0.03)
    y_share = (rows[1] - rows[0]) / (rows[2] - rows[0])
    assert y_share == pytest.approx((losses[1] - losses[0]) / (losses[2] - losses[0]), abs=0.03)


def test_cli_prints_the_table_and_where_the_files_went(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["sweep-report", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| job | overrides | adapter_params | train_loss | eval_loss | tokens_per_s |" in printed
    assert f"| 0 | {RANK}=8 | 12288 | 6.8500 | 6.7123 | 4000.0000 | 24 |" in printed
    for name in ("sweep_report.md", "sweep_report.csv", "sweep_report.png"):
        assert str(out / name) in printed and (out / name).is_file()
        assert not (sweep / name).exists()


def test_cli_exits_2_naming_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert cli_main(["sweep-report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bdlora sweep-report: error: {tmp_path / 'run'}: no job subdirectories")
    assert "one subdirectory per job named 0, 1" in err
    with pytest.raises(ValueError, match="no such directory; a sweep directory is a Hydra multirun"):
        write_sweep_report(tmp_path / "missing")


@pytest.mark.slow
def test_report_of_a_real_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "bdlora.train", "-m", "experiment=demo", "steps=2", "eval_every=0"]
    command += ["parallel.tp=1", "data.num_examples=200", "data.seq_len=32", "logger.progress=false"]
    command += [f"{RANK}=4,8", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = write_sweep_report(sweep)
    assert report.failed == []
    assert [r["overrides"] for r in report.rows] == [f"{RANK}=4", f"{RANK}=8"]  # sorted by size
    assert report.rows[0]["adapter_params"] < report.rows[1]["adapter_params"]
    assert all(isinstance(r["eval_loss"], float) for r in report.rows)
    assert len(red_clusters(report.png_path)) == 2
