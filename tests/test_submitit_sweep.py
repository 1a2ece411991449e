"""A 4-point per-group rank sweep through submitit's local executor, then its report: the table
and the plot must say the same thing as the runs' own files."""

from __future__ import annotations

import json

import pytest

from bdlora.cli import main as cli_main
from tests.test_sweep_report import red_clusters
from tests.test_train import output_of, train

SWEEP = [
    "-m",
    "hydra/launcher=bdlora_local",
    "hydra.launcher.timeout_min=10",
    "experiment=demo",
    "parallel.tp=1",
    "steps=3",
    "eval_every=3",
    "eval_batches=2",
    "logger.progress=false",
    "data.num_examples=200",
    "data.seq_len=32",
    "adapter.groups.attn.rank=4,8",
    "adapter.groups.mlp.rank=8,16",
]


@pytest.mark.slow
def test_a_per_group_rank_sweep_through_submitit_and_its_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    result = train(1, *SWEEP, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output_of(result)
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]

    assert cli_main(["sweep-report", str(sweep)]) == 0
    printed = capsys.readouterr().out
    truth = {}
    for job in range(4):
        plan = json.loads((sweep / str(job) / "plan.json").read_text())
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        truth[job] = (plan["params"], summary["eval"]["eval_loss"])
    # the table: one row per job, each with its own plan's size and eval loss, smallest adapter first
    table = [line for line in (sweep / "sweep_report.md").read_text().splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in table[0].strip("|").split("|")], table[1:]
    assert len(rows) == 4, table
    seen = {}
    for line in rows:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        job = int(cells["job"])
        seen[job] = int(cells["adapter_params"].replace(",", ""))
        assert seen[job] == truth[job][0]
        assert float(cells["eval_loss"]) == pytest.approx(truth[job][1], abs=1e-4)
        assert "adapter.groups.attn.rank=" in cells["overrides"] and "experiment" not in cells["overrides"]
    assert list(seen.values()) == sorted(seen.values()) and len(set(seen.values())) == 4
    assert "sweep_report.png" in printed

    # the plot: four markers, left to right by adapter size, top to bottom by eval loss
    clusters = red_clusters(sweep / "sweep_report.png")
    assert len(clusters) == 4, clusters
    by_column = [c for c in sorted(clusters, key=lambda c: c[1])]
    by_size = sorted(truth.values(), key=lambda t: t[0])
    rows_top_down = [loss for _, loss in sorted(zip([c[0] for c in by_column], [t[1] for t in by_size]))]
    assert rows_top_down == sorted(rows_top_down, reverse=True), (clusters, truth)
