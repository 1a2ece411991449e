"""scripts/bench_gpu.py at its tiny CPU shapes: rows, timings, FLOP counts and the equal-work check."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bdlora.roles import Role

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
TINY_MODELS = ("tiny-8b-like", "tiny-70b-like")
LAYERS = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
TPS = (1, 2, 4, 8)
RANKS = (8, 16)


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--tiny --json`` run shared by the tests below: (returned result, JSON file, stdout)."""
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = bench.main(["--tiny", "--json", str(path)])
    return result, json.loads(path.read_text()), out.getvalue()


def test_every_layer_row_is_present_once(tiny_run):
    _, rows, _ = tiny_run
    got = sorted((r["model"], r["layer"], r["tp"], r["rank"]) for r in rows["layers"])
    assert got == sorted(itertools.product(TINY_MODELS, LAYERS, TPS, RANKS))


def test_shard_shapes_local_blocks_and_rank_follow_the_tp_degree(tiny_run):
    _, rows, _ = tiny_run
    models = {m.name: m for m in bench.TINY_MODELS}
    for r in rows["layers"]:
        role, d_in, d_out = models[r["model"]].layers()[r["layer"]]
        expected = (d_in, d_out // r["tp"]) if role is Role.COLUMN else (d_in // r["tp"], d_out)
        assert (r["d_in"], r["d_out"]) == expected, r
        assert r["blocks_local"] == (8 if r["tp"] == 1 else 1), r
        assert r["rank_local"] == r["rank"] // r["tp"], r


def test_timings_are_positive_and_finite(tiny_run):
    _, rows, _ = tiny_run
    timings = [v for r in rows["layers"] + rows["train"] for k, v in r.items() if k.startswith("ms_")]
    timings = [v for v in timings if v is not None]  # bdlora_compiled is off on CPU by default
    assert len(timings) >= 4 * len(rows["layers"]) + 2 * len(rows["train"])
    assert all(math.isfinite(v) and v > 0 for v in timings)
    assert all(math.isfinite(r["tflops_bdlora"]) and r["tflops_bdlora"] > 0 for r in rows["layers"])
    assert [r["impl"] for r in rows["train"]] == ["bdlora", "peft_lora"]
    assert all(r["tokens_per_s"] > 0 for r in rows["train"])


def test_json_matches_returned_rows_and_tables_are_printed(tiny_run):
    result, rows, out = tiny_run
    assert rows == json.loads(json.dumps(result))
    assert out.startswith("$ python scripts/bench_gpu.py --tiny --json")
    assert f"device cpu, torch {torch.__version__}, peft " in out and "dtype float32" in out
    assert out.count("| tiny-") == len(rows["layers"])
    assert "| bdlora | " in out and "| peft_lora | " in out


def hand_flops(role: Role, tokens: int, d_in: int, d_out: int, rank: int, nblocks: int) -> int:
    """Matmul by matmul; forward once, backward twice (input and weight gradients)."""
    if role is Role.COLUMN:  # x (T, d_in) @ A^T (d_in, r), then nblocks of (T, r/n) @ (r/n, d_out/n)
        forward = 2 * tokens * d_in * rank + nblocks * 2 * tokens * (rank // nblocks) * (d_out // nblocks)
    else:  # nblocks of (T, d_in/n) @ (d_in/n, r/n), then (T, r) @ (r, d_out)
        forward = nblocks * 2 * tokens * (d_in // nblocks) * (rank // nblocks) + 2 * tokens * rank * d_out
    return 3 * forward


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
def test_adapter_flops_equal_hand_count_and_flop_counter(role):
    tokens, d_in, d_out, rank, nblocks = 32, 64, 48, 8, 4
    flops = bench.adapter_flops(role, tokens, d_in, d_out, rank, nblocks)
    assert flops == hand_flops(role, tokens, d_in, d_out, rank, nblocks)
    assert flops == {Role.COLUMN: 3 * (32768 + 6144), Role.ROW: 3 * (8192 + 24576)}[role]
    case = bench.LayerCase("m", "layer", role, 1, d_in, d_out, rank, nblocks)
    layers = bench.build_layers(case, torch.device("cpu"), torch.float32, seed=0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:  # its hooks need .backward(), not autograd.grad
        layers.bd(x).backward(torch.randn(tokens, d_out))
    assert counter.get_total_flops() == flops + bench.base_flops(tokens, d_in, d_out)


def tiny_pair(role: Role):
    case = bench.LayerCase("m", "down_proj" if role is Role.ROW else "q_proj", role, 1, 64, 32, 8, 4)
    layers = bench.build_layers(case, torch.device("cpu"), torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, case.d_in, generator=gen, requires_grad=True)
    return layers, x, torch.randn(16, case.d_out, generator=gen)


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
def test_equal_work_check_passes_on_copied_factors_and_fails_on_permuted_blocks(role):
    layers, x, gy = tiny_pair(role)
    bench.check_equal_work(layers.bd, layers.peft_layer, x, gy, tol=1e-4)
    factor = layers.peft_layer.lora_B if role is Role.COLUMN else layers.peft_layer.lora_A
    with torch.no_grad():  # the same entries in another block order: a layout bug, not a value bug
        w = factor[bench.ADAPTER].weight
        w.copy_(torch.cat(w.chunk(4, 0)[::-1]))
    with pytest.raises(AssertionError, match="bdlora vs PEFT BD-LoRA"):
        bench.check_equal_work(layers.bd, layers.peft_layer, x, gy, tol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_full_run_without_cuda_says_to_use_tiny():
    with pytest.raises(SystemExit, match="needs one.*--tiny"):
        bench.main(["--no-train"])


def test_rank_not_divisible_by_blocks_is_refused_with_the_option_to_change():
    with pytest.raises(SystemExit, match="divisible by nblocks=8.*--ranks"):
        bench.layer_cases(bench.parse_args(["--tiny", "--ranks", "4"]))
