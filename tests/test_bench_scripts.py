"""scripts/bench_memory.py, scripts/bench_scaling.py and their shared scripts/benchlib.py.

The byte counts are checked against values computed here from the config alone; timings are never
asserted. The slow tests run the scripts, which start their own torchrun jobs (gloo, CPU).
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = dict(
    hidden=64, intermediate=128, layers=2, heads=4, vocab=256, seq=16, batch=2, rank=8, nblocks=4, seed=0
)
FP32 = 4
COLUMN_SHAPES = ("q", "k", "v", "gate", "up")


def script(name: str) -> ModuleType:
    """A module of scripts/ (the scripts import each other as top-level modules)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def tiny_args():
    return script("benchlib").ModelArgs(**TINY)


def linear_shapes(m) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each projection of one block (as many KV heads as heads)."""
    h, i = m.hidden, m.intermediate
    return {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def base_bytes_per_rank(m, tp: int) -> int:
    """Embedding, lm_head and norms whole on every rank, plus 1/tp of every sharded linear."""
    replicated = 2 * m.vocab * m.hidden + (2 * m.layers + 1) * m.hidden
    sharded = m.layers * sum(o * i for o, i in linear_shapes(m).values())
    return FP32 * (replicated + sharded // tp)


def adapter_bytes(m) -> int:
    """Unsharded BD-LoRA factors: the block-diagonal one (B of a column layer, A of a row layer) is
    packed, ``(d_out, r / N)`` or ``(r, d_in / N)``."""
    per_block = 0
    for name, (d_out, d_in) in linear_shapes(m).items():
        if name in COLUMN_SHAPES:
            per_block += m.rank * d_in + d_out * m.rank // m.nblocks
        else:
            per_block += m.rank * d_in // m.nblocks + d_out * m.rank
    return FP32 * m.layers * per_block


# -- tier 1: no process group --------------------------------------------------------------------
def test_saved_tensors_of_a_linear_stack_match_a_hand_count():
    benchlib = script("benchlib")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with benchlib.SavedTensors(model) as saved:
        model(x).sum()
    # first linear: x (3x8) for its weight grad; ReLU: its output (3x16), which the second linear
    # saves again (one storage, counted once); the second linear's weight (16x4 view) is a parameter
    assert saved.activation_bytes == FP32 * (3 * 8 + 3 * 16)
    assert saved.parameter_bytes == FP32 * 16 * 4

    model[0].requires_grad_(False)
    with benchlib.SavedTensors(model) as saved:
        model(x).sum()
    assert saved.activation_bytes == FP32 * 3 * 16  # nothing needs x any more


def test_unsharded_bytes_match_the_config():
    benchlib = script("benchlib")
    m = tiny_args()
    model = benchlib.build_llama(m, None, adapter=True)
    assert benchlib.param_bytes(model) == {"base": base_bytes_per_rank(m, 1), "adapter": adapter_bytes(m)}
    step, optimizer = benchlib.make_train_step(model, benchlib.token_batch(m))
    step()
    factors = len(benchlib.adapter_factors(model))
    assert factors == 2 * 7 * m.layers
    # exp_avg and exp_avg_sq like each factor, plus one scalar step count per factor
    assert benchlib.optimizer_state_bytes(optimizer) == 2 * adapter_bytes(m) + FP32 * factors


def test_scaling_options():
    bench_scaling = script("bench_scaling")
    args = bench_scaling.parse_args(["--quick", "--hidden", "96"])
    assert (args.hidden, args.heads, args.tps) == (96, 4, [1, 2])  # explicit options beat --quick
    with pytest.raises(SystemExit, match="--tps 3"):
        bench_scaling.check_sweeps(bench_scaling.parse_args(["--quick", "--tps", "3"]))


def run_script(cmd: list[str]) -> str:
    """The script's stdout; on failure its stderr too (a torchrun job's traceback)."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, f"{cmd[1]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def test_bench_kernels_checks_every_kernel_against_the_separate_ops_before_timing():
    """scripts/bench_kernels.py refuses to time kernels whose output or gradients differ from the
    separate ops' (its own assert), and prints a row per layer and one for the block."""
    cmd = [sys.executable, str(SCRIPTS / "bench_kernels.py"), "--hidden=64", "--intermediate=128"]
    printed = run_script([*cmd, "--tokens=32", "--reps=2", "--tp=4"])
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "x)" in line]
    assert [row.split(" (")[0] for row in rows] == [
        "| q/k/v_proj",
        "| o_proj",
        "| gate/up_proj",
        "| down_proj",
        "| one block",
    ]
    assert "| q/k/v_proj (64 x 16) | 46.9% |" in rows[0]  # rank 16/4 = 4: 6 * 4 * 80 / (4 * 64 * 16)


# -- tier 2: the scripts' own torchrun jobs ----------------------------------------------------------
@pytest.mark.slow
def test_bench_memory_at_tp2_shards_as_the_config_says(tmp_path):
    out = tmp_path / "memory.json"
    sizes = [f"--{k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, str(SCRIPTS / "bench_memory.py"), "--tp", "2", *sizes, "--json", str(out)]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert printed.startswith("$ python ")
    assert "| loading peak RSS MiB (x TP 1) |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tp"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]  # TP 1 added as reference
    m = tiny_args()
    unsharded, ranks = rows[0], rows[1:]
    assert unsharded["base"] == base_bytes_per_rank(m, 1)
    for r in ranks:
        assert r["base"] == base_bytes_per_rank(m, 2)
        assert 0 < r["activations"] < unsharded["activations"]
        assert r["loading_peak"] > 0 and r["step_peak"] > 0
    for key in ("adapter", "grads"):  # BD-LoRA shards exactly: nothing replicated, nothing missing
        assert sum(r[key] for r in ranks) == unsharded[key] == adapter_bytes(m)


@pytest.mark.slow
def test_bench_scaling_quick_writes_four_plots(tmp_path):
    from PIL import Image

    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_scaling.py"), "--quick", "--tps", "2"]
    cmd += ["--out-dir", str(tmp_path), "--json", str(out)]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for name in ("seq", "rank", "nblocks", "tp"):
        with Image.open(tmp_path / f"scaling_{name}.png") as image:
            assert image.width > 100 and image.height > 100
            darkest, lightest = image.convert("L").getextrema()
            assert darkest < lightest  # something was drawn
    assert "TP degree sweep:" in printed
    sweeps = json.loads(out.read_text())["sweeps"]
    for points in sweeps.values():
        assert all(p["act_bdlora"] > p["act_base"] > 0 and p["base_ms"] > 0 for p in points)
    by_rank = {p["x"]: p["adapter_opt"] for p in sweeps["rank"]}
    assert by_rank[16] > by_rank[8]
    # TP 2 holds half of every factor and its moments, and still one step count per factor
    steps = FP32 * 2 * 7 * 1  # --quick: one layer
    (tp2,) = sweeps["tp"]
    assert 2 * tp2["adapter_opt"] - by_rank[16] == steps
    # the TP sweep also times the dense shardings at the same rank: each holds more per rank
    assert all(tp2[f"{mode}_ms"] > 0 for mode in ("slora", "replicated"))
    assert tp2["adapter_opt_replicated"] > tp2["adapter_opt_slora"] > tp2["adapter_opt_bdlora"]
    header = "| TP degree | base ms | BD-LoRA ms (/ base) | S-LoRA ms (/ base) | replicated ms (/ base) |"
    assert header in printed


@pytest.mark.slow
def test_bench_moe_tiny_prints_three_variants_and_a_finite_overhead():
    import math
    import re

    tiny = dict(hidden=32, layers=1, heads=4, experts=4, vocab=64, seq=16, batch=2, rank=4)
    tiny.update({"kv-heads": 4, "moe-intermediate": 32, "steps": 2, "warmup": 1})
    cmd = [sys.executable, str(SCRIPTS / "bench_moe.py"), *(f"--{k}={v}" for k, v in tiny.items())]
    printed = run_script(cmd)
    assert printed.startswith("$ python ")
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    labels = [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]]
    for label in ("frozen base", "BD-LoRA attention", "BD-LoRA attention + experts"):
        assert label in labels
    # per token, forward: frozen linears 4 x 2*32*32 + k=2 x (2*32*64 + 2*32*32) = 20,480; BD-LoRA on
    # attention 3 x 2*4*(32 + 32/2) + 2*4*(32/2 + 32) = 1,536, on the experts 2 x (2*4*(32 + 64/2) +
    # 2*4*(32/2 + 32)) = 1,792; a step: 3 x adapter / (2 x base) = 24.375%
    expert_share = next(row for row in rows if row.startswith("| BD-LoRA attention + experts |"))
    assert "24.38%" in expert_share
    overhead = re.search(r"overhead experts over base: (\S+)% = (\S+)x its FLOP share", printed)
    assert overhead is not None
    assert all(math.isfinite(float(v)) for v in overhead.groups())


@pytest.mark.slow
def test_bench_tp_tiny_compares_replicated_with_bdlora_and_slora():
    """scripts/bench_tp.py at TP 2 on a 1-layer Llama of tiny-llama's sizes (hidden 64, intermediate
    128, 4 heads), rank 8: replicated adds to the base one backward all-reduce of its whole factors
    and holds, per rank, what the whole BD-LoRA adapter holds (nblocks = TP)."""
    import re

    tiny = dict(hidden=64, intermediate=128, layers=1, heads=4, vocab=256, seq=16, batch=2, rank=8)
    tiny.update(steps=2, warmup=0)
    cmd = [
        sys.executable,
        str(SCRIPTS / "bench_tp.py"),
        "--tp",
        "2",
        *(f"--{k}={v}" for k, v in tiny.items()),
    ]
    printed = run_script(cmd)
    assert printed.startswith("$ python ")
    rows = {  # the communication table's
        line.split(" | ")[0].removeprefix("| "): line for line in printed.splitlines() if " coll, " in line
    }
    # one layer: the attention's and the MLP's g forward, their f backward (the embedding requires grad)
    assert "| 2 (all_reduce 2) + 2 (all_reduce 2) |" in rows["base"]
    assert "| 2 (all_reduce 2) + 3 (all_reduce 3) |" in rows["replicated"]  # + the gradient sum
    assert "| +1 coll, +0.014 MiB |" in rows["replicated"]  # 3,584 fp32 gradients: 14,336 B
    assert "+0 coll, +0.000 MiB" in rows["BD-LoRA"]
    checks = [line for line in printed.splitlines() if "predicted" in line]
    assert len(checks) == 8 and all(line.endswith("match") for line in checks), checks
    overheads = [line for line in printed.splitlines() if "x its FLOP share (" in line]
    assert [line.split(" adapter FLOPs")[0] for line in overheads] == ["BD-LoRA", "S-LoRA", "replicated"]
    assert all("medians of 2 runs of 1 repetitions" in line for line in overheads), overheads
    # per rank, by hand (tests/test_memory_plan.py's tiny-llama count, one layer): replicated 6,144
    # (column A whole, B's rows; row A's columns, B whole), S-LoRA 4,864 (row B whole), BD-LoRA 3,072
    for label, total, per_rank in (
        ("BD-LoRA", 6_144, 3_072),
        ("S-LoRA", 8_704, 4_864),
        ("replicated", 8_704, 6_144),
    ):
        memory = next(r for r in printed.splitlines() if r.startswith(f"| {label} | {total:,} / "))
        cells = memory.split(" | ")
        assert cells[1] == f"{total:,} / {per_rank:,}", memory
        assert float(cells[2]) == pytest.approx(FP32 * per_rank / 2**20, abs=1e-3)  # adapter MiB
        assert float(cells[4]) == pytest.approx(FP32 * per_rank / 2**20, abs=1e-3)  # grads MiB
        assert cells[5] == f"{6 * per_rank:,}", memory  # training FLOPs per token: 6 per element held
    for ratio in ("BD-LoRA / replicated", "replicated / base", "BD-LoRA / S-LoRA"):
        line = next(r for r in printed.splitlines() if r.startswith(f"step time {ratio}:"))
        found = re.fullmatch(r".*: +(\S+) +\(paired ratios: median (\S+), quartiles (\S+)-(\S+)\)", line)
        assert found is not None and all(math.isfinite(float(v)) for v in found.groups()), line


@pytest.mark.slow
def test_peft_tp_records_a_loss_comparison_or_the_error_with_versions(tmp_path):
    """scripts/peft_tp.py: PEFT LoRA on transformers' TP beside bdlora (about 20 s). PEFT's or
    transformers' failure is its finding (exit 0, the error and the versions in the JSON)."""
    out = tmp_path / "peft_tp.json"
    cmd = [sys.executable, str(SCRIPTS / "peft_tp.py"), "--steps", "2", "--warmup", "1", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    found = json.loads(out.read_text())
    assert {"torch", "transformers", "peft"} <= found["versions"].keys()
    assert set(found["cases"]) == {"all", "qkv"}
    for case in found["cases"].values():
        ours, theirs = case["bdlora"], case["peft_tp"]
        assert ours["loss_equal"] and ours["grads_equal"] and ours["step_ms"] > 0
        assert ours["comm"]["total"]["count"] > 0
        if theirs["ok"]:  # a comparison: the loss, against the one-process PEFT model
            assert abs(theirs["loss"] - case["reference_loss"]) == pytest.approx(theirs["loss_diff"])
            assert theirs["comm"]["total"]["count"] > 0
        else:  # a recorded failure: where, what, and the frames it came from
            error = theirs["error"]
            assert error["type"] and error["message"] and error["frames"] and error["stage"]
            assert error["message"] in result.stdout
