"""The Hydra trainer: every config option composes (tier 1), and real CLI runs on CPU gloo: a full
two-rank run, kill-and-resume, resume at another TP degree, and bad input stopping before training.

The subprocess tests share one uninterrupted two-rank run (``baseline``) as their reference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from bdlora import BDLoraConfig, load_adapter, resolve_plan
from bdlora.parallel.checkpoint import load_sharded_adapter
from bdlora.presets import build_model, preset_config
from bdlora.train.checkpoint import COMPLETE, complete_checkpoints, step_dir_name
from bdlora.train.config import TrainConfig, register_configs
from tests.conftest import logits

CONF_DIR = Path(__file__).resolve().parents[1] / "bdlora" / "conf"
GROUPS = ("model", "adapter", "data", "parallel", "optim", "logger", "deepspeed", "experiment")
NEEDS_SOURCE = {("data", "jsonl"), ("data", "hf_json")}  # `source: ???` in the file

# --- tier 1: composition, no process group ------------------------------------------------------


def compose_train(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    found = {g for g, _ in group_options()}
    assert found == set(GROUPS), f"groups without a yaml file: {set(GROUPS) - found}"


@pytest.mark.parametrize(("group", "option"), group_options())
def test_group_option_composes_and_instantiates(group, option):
    extra = ["data.source=/data/train.jsonl"] if (group, option) in NEEDS_SOURCE else []
    cfg = compose_train([f"{group}={option}", *extra])

    train = OmegaConf.to_object(cfg)

    assert isinstance(train, TrainConfig)
    assert isinstance(train.adapter.build(), BDLoraConfig)
    # the option was really selected: its own values are in the composed config
    raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    raw.pop("defaults", None)
    if group == "experiment":
        assert train.run_name == raw["run_name"]
        assert train.steps == raw["steps"]
        return
    if (group, option) in NEEDS_SOURCE:
        raw.pop("source")
    assert_holds(OmegaConf.to_container(cfg[group], resolve=False), raw, f"{group}={option}")


def assert_holds(node: dict, expected: dict, where: str) -> None:
    """Every value of ``expected`` (nested) is in ``node``; ``node`` may hold more (schema defaults)."""
    for key, value in expected.items():
        if isinstance(value, dict) and value:
            assert_holds(node[key], value, f"{where}.{key}")
        else:
            assert node[key] == value, f"{where}: {key} is {node[key]!r}, the file says {value!r}"


@pytest.mark.parametrize("rank", [8, 4])
def test_per_layer_mul_resolves_to_twice_the_rank(rank, tiny_llama):
    train = OmegaConf.to_object(compose_train(["adapter=per_layer", f"adapter.rank={rank}"]))

    adapter = train.adapter.build()

    assert adapter.patterns[r"layers\.0\..*"]["rank"] == 2 * rank
    ranks = {m.name: m.settings.rank for m in resolve_plan(tiny_llama, adapter).modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 * rank
    assert ranks["model.layers.1.self_attn.q_proj"] == rank
    assert "model.layers.0.self_attn.k_proj" not in ranks  # the null pattern excludes it


def test_typo_in_a_key_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["optim.lrr=1"])
    assert "lrr" in f"{info.value} {info.value.__cause__}"


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["steps=many"])
    assert "steps" in f"{info.value} {info.value.__cause__}"


def test_missing_data_source_names_the_key():
    cfg = compose_train(["data=jsonl"])
    with pytest.raises(MissingMandatoryValue, match=r"data\.source"):
        OmegaConf.to_object(cfg)


# --- subprocess runs through the real CLI -------------------------------------------------------

STEPS = 40  # steps run in milliseconds; enough headroom for an interrupt to land mid-run
CKPT_EVERY = 4
COMM_EVERY = 10
KILL_AFTER = 6  # interrupt once metrics.jsonl shows this step
RUN_ARGS = [
    "experiment=demo",
    f"steps={STEPS}",
    "eval_every=0",
    "data.num_examples=400",
    "data.seq_len=64",
    "data.micro_batch_size=8",
    "logger.progress=false",
    f"logger.comm_every={COMM_EVERY}",
    f"checkpoint.every={CKPT_EVERY}",
    "checkpoint.keep_last=0",  # keep all: later tests compare against intermediate checkpoints
]
STEP_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "peak_mem_mb"}
RUN_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(nproc: int, *overrides: str) -> list[str]:
    if nproc == 1:  # a plain process is a world of one
        return [sys.executable, "-m", "bdlora.train", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "bdlora.train", *overrides]


def train_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(_free_port())}


def train(
    nproc: int, *overrides: str, cwd: Path, timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(nproc, *overrides),
        cwd=cwd,
        env={**train_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"{result.stdout}\n{result.stderr}"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def by_step(records: list[dict], key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records}


def adapter_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapter of a sharded training checkpoint, restored into a fresh tiny-llama at TP 1."""
    model = build_model("tiny-llama", seed=0)
    load_sharded_adapter(model, checkpoint)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@dataclass
class Run:
    cwd: Path
    run_dir: Path
    result: subprocess.CompletedProcess
    metrics: list[dict]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    """One uninterrupted two-rank TP2 run through torchrun; the reference for the tests below."""
    cwd = tmp_path_factory.mktemp("baseline")
    run_dir = cwd / "run"
    result = train(2, *RUN_ARGS, f"run_dir={run_dir}", cwd=cwd)
    assert result.returncode == 0, output_of(result)
    return Run(cwd, run_dir, result, read_metrics(run_dir))


@pytest.mark.slow
def test_two_rank_run_writes_a_complete_run_directory(baseline):
    run_dir = baseline.run_dir
    assert sorted(p.name for p in baseline.cwd.iterdir()) == ["run"], "the run wrote into the cwd"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [".hydra", "adapter", "checkpoints", "metrics.jsonl", "plan.json", "summary.json"]
    )
    hydra_files = ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == hydra_files
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.yaml")) == [
        Path(".hydra") / name for name in hydra_files
    ]
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert (saved["steps"], saved["parallel"]["tp"], saved["run_dir"]) == (STEPS, 2, str(run_dir))
    assert "experiment=demo" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())

    final = run_dir / "checkpoints" / step_dir_name(STEPS)
    assert (final / COMPLETE).read_text() == str(STEPS)
    assert complete_checkpoints(run_dir / "checkpoints")[-1] == final
    assert not list((run_dir / "checkpoints").glob(".*partial"))


@pytest.mark.slow
def test_two_rank_run_logs_one_record_per_step(baseline):
    records = baseline.metrics

    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert STEP_KEYS <= r.keys(), f"step {r['step']} lacks {STEP_KEYS - r.keys()}"
        assert all(math.isfinite(r[k]) for k in STEP_KEYS), r
    counted = {r["step"] for r in records if "tp_collectives" in r}
    assert counted == {1, *range(COMM_EVERY, STEPS + 1, COMM_EVERY)}
    for r in records:
        if r["step"] in counted:
            assert r["tp_collectives"] > 0 and r["tp_bytes"] > 0, r
    assert "eval_loss" in records[-1]
    first, last = (sum(r["loss"] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last < first, f"training did not lower the loss: {first:.4f} -> {last:.4f}"


@pytest.mark.slow
def test_exported_adapter_loads_in_vanilla_peft(baseline):
    from peft import PeftModel

    adapter_dir = baseline.run_dir / "adapter"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))

    peft_model = PeftModel.from_pretrained(build_model("tiny-llama", seed=0), str(adapter_dir)).eval()
    ours = load_adapter(build_model("tiny-llama", seed=0), adapter_dir).eval()

    expected = logits(ours, ids)
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)
    assert (expected - logits(build_model("tiny-llama", seed=0), ids)).abs().max() > 1e-3


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float) -> int:
    """Poll ``metrics`` until it shows ``step`` (an event wait); returns the last step seen."""
    deadline, seen = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and proc.poll() is None:
        text = metrics.read_text() if metrics.is_file() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: the run may be mid-write
        seen = json.loads(lines[-1])["step"] if lines else 0
        if seen >= step:
            return seen
        time.sleep(0.01)
    return seen


def interrupt(nproc: int, args: list[str], run_dir: Path, after_step: int) -> tuple[subprocess.Popen, int]:
    """Start a run, SIGTERM its process group once metrics.jsonl shows ``after_step``; returns the
    finished process and the last step it had logged. The log goes beside ``run_dir``."""
    with (run_dir.parent / "interrupted.log").open("w") as log:
        proc = subprocess.Popen(
            train_command(nproc, *args, f"run_dir={run_dir}"),
            cwd=run_dir.parent,
            env=train_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # torchrun and its workers form one process group
        )
        try:
            seen = wait_for_step(proc, run_dir / "metrics.jsonl", after_step, timeout=RUN_TIMEOUT)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc, seen


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(baseline, tmp_path):
    run_dir = tmp_path / "run"
    proc, seen = interrupt(2, RUN_ARGS, run_dir, KILL_AFTER)
    interrupted = read_metrics(run_dir)
    assert seen >= KILL_AFTER, (tmp_path / "interrupted.log").read_text()
    assert proc.returncode != 0 and interrupted[-1]["step"] < STEPS, "the run ended before the interrupt"

    root = run_dir / "checkpoints"
    complete = complete_checkpoints(root)
    assert complete, "no complete checkpoint survived the interrupt"
    last = complete[-1]
    resumed_at = int((last / COMPLETE).read_text())
    assert last.name == step_dir_name(resumed_at) and resumed_at >= CKPT_EVERY
    # SIGTERM asks for a stop: every rank finishes the step it is in, and that step is checkpointed
    log = (tmp_path / "interrupted.log").read_text()
    assert f"stopped by SIGTERM after step {resumed_at}" in log, log
    assert interrupted[-1]["step"] == resumed_at, (interrupted[-1], resumed_at)
    # the periodic checkpoints before the stop are intact and equal to the uninterrupted run's
    periodic = step_dir_name(resumed_at // CKPT_EVERY * CKPT_EVERY)
    restored = adapter_state(root / periodic)
    reference = adapter_state(baseline.run_dir / "checkpoints" / periodic)
    assert restored.keys() == reference.keys() and restored
    for name, value in restored.items():
        assert torch.equal(value, reference[name]), name

    result = train(2, *RUN_ARGS, "checkpoint.resume=auto", f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert f"at step {resumed_at}" in result.stdout
    final = read_metrics(run_dir)
    # the steps the interrupted run logged after its checkpoint are replaced, not repeated
    assert [r["step"] for r in final if "loss" in r] == list(range(1, STEPS + 1))
    resumed = [r for r in final if r["step"] > resumed_at]
    assert [r["step"] for r in resumed] == list(range(resumed_at + 1, STEPS + 1))
    # a checkpoint the interrupt cut short is rebuilt, never left beside the complete ones
    assert not list(root.glob(".*partial")), sorted(p.name for p in root.iterdir())
    expected, expected_lr = by_step(baseline.metrics), by_step(baseline.metrics, "lr")
    for r in resumed:
        assert r["lr"] == expected_lr[r["step"]], (r["step"], r["lr"], expected_lr[r["step"]])
        assert abs(r["loss"] - expected[r["step"]]) < 1e-6, (r["step"], r["loss"], expected[r["step"]])


@pytest.mark.slow
def test_resume_at_another_tp_degree(baseline, tmp_path):
    """A TP2 checkpoint continues on one process at TP1, on the same trajectory up to rounding."""
    run_dir = tmp_path / "run"
    saved = step_dir_name(CKPT_EVERY)
    shutil.copytree(baseline.run_dir / "checkpoints" / saved, run_dir / "checkpoints" / saved)

    result = train(
        1, *RUN_ARGS, "parallel.tp=1", "checkpoint.resume=auto", f"run_dir={run_dir}", cwd=tmp_path
    )

    assert result.returncode == 0, output_of(result)
    assert "saved at tp=2" in result.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(CKPT_EVERY + 1, STEPS + 1))
    expected = by_step(baseline.metrics)
    assert by_step(records, "lr") == {
        s: lr for s, lr in by_step(baseline.metrics, "lr").items() if s > CKPT_EVERY
    }
    got = by_step(records)
    torch.testing.assert_close(
        torch.tensor(list(got.values())),
        torch.tensor([expected[s] for s in got]),
        rtol=1e-4,
        atol=1e-4,
    )


BAD_INPUTS = [
    pytest.param(1, ["data.source=/nonexistent/x.jsonl"], ["data.source", "/nonexistent/x.jsonl"], id="path"),
    pytest.param(
        1,
        ["data.num_examples=3", "data.micro_batch_size=64"],
        ["blocks", "needs", "micro_batch_size"],
        id="too-small",
    ),
    pytest.param(
        1,
        ["data.seq_len=100000"],
        [
            "data.seq_len=100000",
            f"max_position_embeddings={preset_config('tiny-llama').max_position_embeddings}",
        ],
        id="seq-len",
    ),
    pytest.param(2, ["parallel.tp=2", "adapter.nblocks=1"], ["nblocks=1", "TP degree 2"], id="nblocks-tp"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "overrides", "messages"), BAD_INPUTS)
def test_bad_input_stops_before_training_with_a_message(nproc, overrides, messages, tmp_path):
    run_dir = tmp_path / "run"
    args = ["logger.progress=false", "steps=3", *overrides, f"run_dir={run_dir}"]

    result = train(nproc, *args, cwd=tmp_path, timeout=180)  # a rank left in a collective would hang

    assert result.returncode != 0
    for message in messages:
        assert message in output_of(result), f"{message!r} not in:\n{output_of(result)}"
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_writes_no_key(tmp_path):
    run_dir = tmp_path / "run"
    env_key = "WANDB_API_KEY"
    result = subprocess.run(
        train_command(
            1,
            "logger=wandb",
            "steps=3",
            "eval_every=0",
            "data.num_examples=200",
            "data.seq_len=32",
            f"run_dir={run_dir}",
        ),
        check=False,
        cwd=tmp_path,
        env={**train_env(), env_key: "secret-key-that-must-not-be-written"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, output_of(result)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    written = [
        p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl", ".log")
    ]
    assert written
    for path in written:
        assert "secret-key-that-must-not-be-written" not in path.read_text(errors="replace"), path


EQUAL_BATCH_ARGS = [
    "experiment=demo",
    "steps=4",
    "eval_every=0",
    "data.num_examples=400",
    "data.seq_len=64",
    "logger.progress=false",
    "optim.lr=1e-2",
]


def trained(nproc: int, tmp_path: Path, name: str, *overrides: str) -> tuple[dict, dict]:
    """(per-step losses, final adapter) of a trainer run through the CLI."""
    run_dir = tmp_path / name
    result = train(nproc, *EQUAL_BATCH_ARGS, *overrides, f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    final = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    return by_step(read_metrics(run_dir)), adapter_state(final)


@pytest.mark.slow
def test_grad_accum_and_dp2_x_tp2_equal_the_larger_batch(tmp_path):
    """8 rows per step, split four ways: one batch (TP 1, one process, the reference), two
    accumulated micro-batches, DP 2 (rank 0 alone exports), and DP 2 x TP 2 on four ranks; and the
    whole batch at TP 2 with vocabulary and sequence parallelism.
    The loss weighs every target token the same (prompt tokens are masked, so micro-batches
    hold different counts of them)."""
    losses, adapter = trained(1, tmp_path, "batch8", "parallel.tp=1", "data.micro_batch_size=8")
    runs = {
        "accum2": trained(
            1, tmp_path, "accum2", "parallel.tp=1", "data.micro_batch_size=4", "optim.grad_accum=2"
        ),
        "dp2": trained(2, tmp_path, "dp2", "parallel.tp=1", "data.micro_batch_size=4"),
        "dp2xtp2": trained(4, tmp_path, "dp2xtp2", "parallel.tp=2", "data.micro_batch_size=4"),
        "tp2-vocab-sequence": trained(
            2,
            tmp_path,
            "tp2-vocab-sequence",
            "parallel.tp=2",
            "data.micro_batch_size=8",
            "parallel.vocab_parallel=true",
            "parallel.sequence_parallel=true",
        ),
    }
    for name, (got_losses, got_adapter) in runs.items():
        assert got_losses.keys() == losses.keys() == {1, 2, 3, 4}
        for step, loss in losses.items():
            assert abs(got_losses[step] - loss) < 1e-5, (name, step, got_losses[step], loss)
        # AdamW normalises each element's gradient, so rounding noise on elements whose gradient is
        # near zero (B starts at 0) moves them by up to ~3e-5 after four steps of lr 1e-2
        for key, value in adapter.items():
            torch.testing.assert_close(got_adapter[key], value, atol=1e-4, rtol=1e-4)
