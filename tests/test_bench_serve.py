"""scripts/bench_serve.py: base, vLLM's default LoRA, S-LoRA and BD-LoRA served side by side.

The fast tests check the parameter counts, the option defaults, the checks that refuse a run that
measured nothing, and the table, on hand-made engine results. The slow test runs ``--quick`` (four
vLLM engines at TP 2, about 2.5 minutes on 2 cores) when the serving venv exists. Timings are never
compared, only required to be positive.
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SERVE_PYTHON = SCRIPTS.parent / ".venv-serve" / "bin" / "python"


def bench_serve():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module("bench_serve")


def test_parameter_counts_follow_the_formulas():
    bs = bench_serve()
    shapes = bs.module_shapes(hidden=512, intermediate=1536, heads=8, kv_heads=8)
    # dense r (d_in + d_out): 4 attention x 1024 + 3 MLP x 2048 = 10,240 per unit of rank
    assert bs.dense_params(shapes, 16, layers=1) == 16 * 10_240
    # BD-LoRA, N = 4: q, k, v 512 + 128; o 128 + 512; gate, up 512 + 384; down 384 + 512 = 5,248
    assert bs.bd_params(shapes, 32, nblocks=4, layers=2) == 2 * 32 * 5_248
    assert bs.matched_bd_rank(shapes, 16, 4) == 32  # 167,936 against 163,840
    gqa = bs.module_shapes(hidden=512, intermediate=1536, heads=8, kv_heads=2)
    assert gqa["k_proj"] == (512, 128) and gqa["down_proj"] == (1536, 512)
    assert [bs.vllm_max_lora_rank(r) for r in (1, 2, 16, 28, 300)] == [1, 8, 16, 32, 320]


def test_quick_defaults_and_explicit_options():
    bs = bench_serve()
    quick = bs.parse_args(["--quick"])
    assert (quick.tp, quick.adapters, quick.layers, quick.nblocks) == ([2], [1, 4], 1, 4)
    full = bs.parse_args([])
    assert (full.tp, full.adapters, full.layers, full.batch, full.nblocks) == ([2, 4], [1, 4, 16], 4, 16, 4)
    assert bs.parse_args(["--quick", "--layers", "3", "--tp", "2", "4"]).layers == 3
    assert bs.parse_args(["--tp", "2", "8"]).nblocks == 8
    assert bs.parse_args(["--tp", "3"]).nblocks == 6  # a multiple of every TP degree, at least 4
    with pytest.raises(SystemExit, match="--intermediate 1000 is not a multiple of --nblocks 16"):
        bs.check_args(
            bs.parse_args(["--tp", "2", "16", "--heads", "16", "--hidden", "1024", "--intermediate", "1000"])
        )
    with pytest.raises(SystemExit, match="--nblocks 4 is not a multiple of TP 8"):
        bs.check_args(bs.parse_args(["--tp", "8", "--nblocks", "4", "--heads", "8", "--hidden", "512"]))
    with pytest.raises(SystemExit, match="CPU attention"):
        bs.check_args(bs.parse_args(["--hidden", "128", "--heads", "8"]))


def fake_engine(tp: int, mode: str, tps: float, tokens: dict[str, list[list[int]]]) -> dict:
    """What a worker writes, with made-up numbers and the layers each mode's engine holds."""
    layer = {
        "lora": "MergedQKVParallelLinearWithLoRA",
        "slora": "MergedQKVParallelLinearWithShardedLoRA",
        "bdlora": "BlockDiagonalQKVLoRA",
    }.get(mode)
    entry = {"count": 1, "a_shape": [16, 1, 32, 512], "b_shape": [16, 1, 768, 32]}
    if mode == "bdlora":
        entry.update(bd_a_shape=[16, 1, 32 // tp, 512], bd_slots=16, dense_slots=0)
    sample = {"wall_s": 1.0, "tokens": 64, "tokens_per_s": tps, "tpot_ms": 1e3 / tps, "tpot_from": "metrics"}
    rounds = [sample, {**sample, "tokens_per_s": tps / 2}, sample]  # a slow round on every engine alike
    return {
        "mode": mode,
        "tp": tp,
        "max_lora_rank": 32 if mode == "bdlora" else 16,
        "dtype": "float32",
        "tokens": tokens,
        "samples": {n: [{**sample, "round": f"0:{i}"} for i, sample in enumerate(rounds)] for n in tokens},
        "layers": [] if layer is None else [{layer: entry, "VocabParallelEmbeddingWithLoRA": {}}] * tp,
    }


def fake_results() -> dict:
    base_tokens = [[1, 2], [3, 4]]
    results = {(2, "base"): fake_engine(2, "base", 100.0, {"0": base_tokens})}
    for mode, tps, delta in (("lora", 50.0, 10), ("slora", 40.0, 10), ("bdlora", 60.0, 20)):
        tokens = {"0": base_tokens, "1": [[1, 2], [3, delta]], "4": [[delta, 2], [3, delta]]}
        results[(2, mode)] = fake_engine(2, mode, tps, tokens)
    return results


def test_table_rows_and_ratios():
    bs = bench_serve()
    rows = bs.table_rows(fake_results(), [1, 4])
    assert [(r["mode"], r["adapters"]) for r in rows] == [
        ("base", 0),
        *[(m, n) for n in (0, 1, 4) for m in ("lora", "slora", "bdlora")],
    ]
    bd = rows[-1]
    assert bd["tokens_per_s"] == {"median": 60.0, "min": 30.0, "max": 60.0}
    assert bd["vs_base"] == pytest.approx(0.6)
    assert bd["vs_slora"] == pytest.approx(1.5) and bd["vs_lora"] == pytest.approx(1.2)
    assert (bd["paired_vs_base"], bd["paired_vs_slora"]) == (pytest.approx(0.6), pytest.approx(1.5))
    table = bs.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2] == "| 2 | base | - | 100.0 (50.0-100.0) | 10.00 (10.00-10.00) | 1.000 (1.000) |  |  |"
    assert table[-1].startswith("| 2 | BD-LoRA | 4 | 60.0 (30.0-60.0) |")
    assert table[-1].endswith("| 0.600 (0.600) | 1.500 (1.500) | 1.200 (1.200) |")


def test_paired_ratios_match_rounds():
    bs = bench_serve()
    ours = [{"tokens_per_s": 10.0, "round": "0:1"}, {"tokens_per_s": 20.0, "round": "0:2"}]
    ref = [{"tokens_per_s": 10.0, "round": r} for r in ("0:1", "0:2")] + [
        {"tokens_per_s": 1.0, "round": "0:3"}
    ]
    assert bs.paired(ours, ref) == pytest.approx(1.5)
    assert bs.paired(ours, [{"tokens_per_s": 10.0, "round": "1:1"}]) is None  # engines run in turn


def test_checks_refuse_a_run_that_measured_nothing():
    bs = bench_serve()
    notes = bs.check_results(fake_results(), dtype_exact=True)
    assert "TP 2, 4 adapters: bdlora and lora differ on 2/2 requests" in notes
    assert "TP 2, 1 adapters: bdlora and lora differ on 1/2 requests" in notes
    assert "TP 2, 1 adapters: lora and slora agree on 2/2 requests" in notes

    unchanged = fake_results()
    unchanged[(2, "bdlora")]["tokens"]["4"] = unchanged[(2, "bdlora")]["tokens"]["0"]
    with pytest.raises(AssertionError, match="bdlora, 4 adapters: greedy tokens equal the base model's"):
        bs.check_results(unchanged, dtype_exact=True)

    other_base = fake_results()
    other_base[(2, "lora")]["tokens"]["0"] = [[9, 9], [9, 9]]
    with pytest.raises(AssertionError, match="do not give the base engine's tokens"):
        bs.check_results(other_base, dtype_exact=True)
    bs.check_results(copy.deepcopy(other_base), dtype_exact=False)  # bf16: reported, not refused

    dense_slots = fake_results()
    entry = dense_slots[(2, "bdlora")]["layers"][0]["BlockDiagonalQKVLoRA"]
    dense_slots[(2, "bdlora")]["layers"][0] = {"BlockDiagonalQKVLoRA": {**entry, "dense_slots": 1}}
    with pytest.raises(AssertionError, match="adapters not in BD-LoRA slots"):
        bs.check_results(dense_slots, dtype_exact=True)

    no_plugin = fake_results()
    no_plugin[(2, "bdlora")]["layers"] = no_plugin[(2, "lora")]["layers"]
    with pytest.raises(AssertionError, match="TP 2 bdlora: unexpected LoRA layers"):
        bs.check_results(no_plugin, dtype_exact=True)


@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path):
    if not SERVE_PYTHON.is_file():
        pytest.skip(f"no serving venv at {SERVE_PYTHON}: run `make setup-serve`")
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_serve.py"), "--quick", "--reps", "2", "--max-tokens", "4"]
    cmd += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    printed = result.stdout
    assert printed.startswith("$ python ")
    table = [line for line in printed.splitlines() if line.startswith("| 2 | ")]
    expected = [("base", "-")] + [(m, n) for n in "014" for m in ("LoRA (vLLM default)", "S-LoRA", "BD-LoRA")]
    assert [tuple(line.split(" | ")[1:3]) for line in table] == expected
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(expected)
    for row in rows:
        assert row["tokens_per_s"]["min"] > 0 and row["tpot_ms"]["min"] > 0 and row["vs_base"] > 0
        if row["mode"] == "bdlora":
            assert row["vs_slora"] > 0 and row["vs_lora"] > 0
    assert "machine: " in printed and "load average" in printed and "vllm 0.32.0" in printed
