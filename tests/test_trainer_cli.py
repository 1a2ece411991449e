"""The trainer as users drive it: Hydra's directory conventions, one run per directory, strict
keys and ranges, errors on every rank, layout-independent eval, wandb resume, fitting defaults.

Runs go through the real CLI (``python -m bdlora.train`` or ``torchrun``), as in tests/test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bdlora.cli import main as cli_main
from bdlora.train.config import TrainConfig, TrainConfigError, check_ranges
from tests.test_train import output_of, read_metrics, train

TINY = ["eval_every=0", "data.num_examples=200", "data.seq_len=32", "logger.progress=false"]


def run_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` that holds a finished run."""
    return sorted(p.parent for p in root.rglob("summary.json"))


# --- tier 1: ranges and suggestions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", -3, "steps=-3: must be >= 1"),
        ("optim.grad_accum", 0, "optim.grad_accum=0: must be >= 1"),
        ("logger.log_every", -1, "logger.log_every=-1: must be >= 0 (0 means never)"),
        ("checkpoint.every", -2, "checkpoint.every=-2: must be >= 0"),
        ("parallel.tp", 0, "parallel.tp=0: must be >= 1"),
        ("optim.lr", 0.0, "optim.lr=0.0: must be > 0"),
    ],
)
def test_out_of_range_settings_name_the_key(key, value, message):
    cfg = TrainConfig()
    owner, _, leaf = key.rpartition(".")
    setattr(cfg if not owner else getattr(cfg, owner), leaf, value)
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_ranges(cfg)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(sequence_parallel=True), "parallel.sequence_parallel=true needs parallel.vocab_parallel=true"),
        (
            dict(sequence_parallel=True, vocab_parallel=True, sharding="slora"),
            "supports parallel.sharding=bdlora, not slora",
        ),
        (
            dict(sequence_parallel=True, vocab_parallel=True, tp=4),
            "data.seq_len=126 is not divisible by parallel.tp=4; use a multiple of 4",
        ),
        (dict(tp=4, ep=3), r"parallel.ep=3: .* must divide parallel.tp=4; valid: \[1, 2, 4\]"),
    ],
)
def test_layout_settings_are_checked_first(settings, message):
    cfg = TrainConfig()
    cfg.data.seq_len = 126
    for key, value in settings.items():
        setattr(cfg.parallel, key, value)
    with pytest.raises(TrainConfigError, match=message):
        check_ranges(cfg)


def test_adapter_schema_has_the_fields_and_defaults_of_bdlora_config():
    from dataclasses import fields

    from bdlora import BDLoraConfig
    from bdlora.train.config import AdapterConfig, plain

    ours = {f.name: f for f in fields(AdapterConfig)}
    theirs = {f.name: f for f in fields(BDLoraConfig)}
    assert list(ours) == [*theirs, "groups", "bands"]  # the two expand into patterns
    shared = {k: v for k, v in plain(vars(AdapterConfig())).items() if k in theirs}
    assert shared == BDLoraConfig().to_dict()


def test_plan_suggests_only_tp_degrees_dividing_heads_and_kv_heads(capsys):
    assert cli_main(["plan", "--model", "qwen2.5-7b", "--tp", "3"]) == 2  # 28 heads, 4 KV heads
    err = capsys.readouterr().err
    assert err.rstrip().endswith("[1, 2, 4]"), err


# --- Hydra's conventions ------------------------------------------------------------------------


@pytest.mark.slow
def test_hydra_run_dir_decides_where_the_run_writes(tmp_path):
    result = train(1, *TINY, "steps=2", "hydra.run.dir=runs/x", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert run_dirs(tmp_path) == [tmp_path / "runs" / "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing under outputs/
    hydra_files = sorted(p.name for p in (tmp_path / "runs" / "x" / ".hydra").iterdir())
    assert hydra_files == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    hydra_yaml = yaml.safe_load((tmp_path / "runs" / "x" / ".hydra" / "hydra.yaml").read_text())
    assert hydra_yaml["hydra"]["run"]["dir"] == "runs/x"


@pytest.mark.slow
def test_ranks_agree_on_a_per_process_hydra_run_dir(tmp_path):
    """``${now:%f}`` (microseconds) resolves differently on each rank; rank 0's choice wins and the
    other rank leaves no directory of its own."""
    result = train(2, *TINY, "steps=2", "parallel.tp=2", "hydra.run.dir=runs/${now:%H%M%S%f}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert len(run_dirs(tmp_path)) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.slow
def test_multirun_under_torchrun_gives_one_directory_per_job_and_sweeps_never_mix(tmp_path):
    first = train(2, "-m", *TINY, "steps=2", "parallel.tp=2", "adapter.rank=4,8", cwd=tmp_path)
    assert first.returncode == 0, output_of(first)
    sweeps = list((tmp_path / "multirun" / "bdlora").iterdir())
    assert len(sweeps) == 1
    assert run_dirs(tmp_path) == [sweeps[0] / "0", sweeps[0] / "1"]
    ranks = [
        yaml.safe_load((sweeps[0] / j / ".hydra" / "config.yaml").read_text())["adapter"]["rank"]
        for j in "01"
    ]
    assert ranks == [4, 8]
    multirun_yaml = (sweeps[0] / "multirun.yaml").read_text()
    second = train(1, "-m", *TINY, "steps=2", "adapter.rank=16", cwd=tmp_path)
    assert second.returncode == 0, output_of(second)
    assert len(list((tmp_path / "multirun" / "bdlora").iterdir())) == 2
    assert (sweeps[0] / "multirun.yaml").read_text() == multirun_yaml


# --- one run, one directory ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_in_a_used_directory_fails_on_every_rank_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    assert train(1, *TINY, "steps=2", f"run_dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = train(2, *TINY, "steps=3", "parallel.tp=2", f"run_dir={run_dir}", cwd=tmp_path)
    assert again.returncode != 0
    out = output_of(again)
    assert f"run directory {run_dir} already holds another run" in out
    assert "checkpoint.resume=auto" in out and "new directory" in out
    assert 'bdlora/train/run.py", line' not in out  # torchrun reports the exit; bdlora prints no traceback
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_multirun_with_run_dir_gives_each_job_its_own_subdirectory(tmp_path):
    run_dir = tmp_path / "sweep"
    result = train(1, "-m", *TINY, "steps=2", "adapter.rank=4,8", f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert run_dirs(tmp_path) == [run_dir / "0", run_dir / "1"]


# --- strict keys, clear errors -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+adapter.rnk=4", "unknown config key 'adapter.rnk': valid keys under 'adapter': rank,"),
        (
            "+optim.learning_rate=0.1",
            "unknown config key 'optim.learning_rate': valid keys under 'optim': lr,",
        ),
        ("steps=-3", "steps=-3: must be >= 1"),
        ("parallel.sharding=dense", "parallel.sharding"),
    ],
)
def test_bad_settings_fail_at_start_with_one_error_line(tmp_path, override, message):
    result = train(1, *TINY, override, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["metrics-file", "wandb-online-without-key"])
def test_a_failure_on_rank_0_alone_stops_every_rank_with_its_message(tmp_path, monkeypatch, cause):
    """Only rank 0 opens metrics.jsonl (here a directory) and starts wandb (here online with no API
    key). Every rank stops with rank 0's error, not with gloo's "Connection closed by peer"."""
    run_dir = tmp_path / "run"
    extra, expected = ["checkpoint.resume=auto"], ["Is a directory", "metrics.jsonl"]
    if cause == "metrics-file":
        (run_dir / "metrics.jsonl").mkdir(parents=True)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        extra, expected = ["logger=wandb", "logger.wandb.mode=online"], ["No API key", "mode=offline"]
    result = train(2, *TINY, "steps=2", "parallel.tp=2", *extra, f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode != 0
    out = output_of(result)
    assert "bdlora-train: error: " in out and all(e in out for e in expected), out
    assert "Connection closed by peer" not in out
    assert 'bdlora/train/run.py", line' not in out


@pytest.mark.slow
def test_log_every_zero_means_never(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        1, *TINY, "steps=3", "eval_every=2", "logger.log_every=0", f"run_dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, output_of(result)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 2, 3]  # only the eval records


# --- metrics that do not depend on the layout ----------------------------------------------------


@pytest.mark.slow
def test_eval_loss_is_the_same_at_dp1_and_dp2(tmp_path):
    # 23 eval blocks: an odd count, which DP 2 cannot split evenly
    args = ["steps=1", "eval_every=1", "data.num_examples=320", "data.seq_len=32", "data.eval_fraction=0.1"]
    args += ["logger.progress=false", "data.micro_batch_size=2"]
    losses = []
    for nproc in (1, 2):
        run_dir = tmp_path / f"dp{nproc}"
        result = train(nproc, *args, f"run_dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, output_of(result)
        losses.append(read_metrics(run_dir)[0])
    assert losses[0]["step"] == losses[1]["step"] == 0
    assert abs(losses[0]["eval_loss"] - losses[1]["eval_loss"]) < 1e-6, losses


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["logger=wandb", *TINY, f"run_dir={run_dir}", "checkpoint.every=2"]
    env_run = dict(cwd=tmp_path)
    assert train(1, *args, "steps=2", **env_run).returncode == 0
    resumed = train(1, *args, "steps=4", "checkpoint.resume=auto", **env_run)
    assert resumed.returncode == 0, output_of(resumed)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    ids = {name.rsplit("-", 1)[1] for name in runs}
    assert len(runs) == 2 and len(ids) == 1, runs
    assert (run_dir / "wandb_run_id").read_text() in ids


# --- data defaults that fit ------------------------------------------------------------------------


@pytest.mark.slow
def test_jsonl_data_fits_the_default_model(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(400)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    result = train(
        1,
        "data=jsonl",
        f"data.source={data}",
        "steps=2",
        "eval_every=0",
        "logger.progress=false",
        f"run_dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, output_of(result)
    assert "data.seq_len not set: using 256 (max_position_embeddings=256" in result.stdout
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["data"]["seq_len"] == 256
