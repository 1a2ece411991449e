"""The public API the way a user's own torchrun script calls it, on gloo ranks (tier 2).

Each test compares against a single-process reference: rank-0-only saving, the every-rank check
on sharded models, ``base_stats`` init and activation checkpointing at TP 2, and the example script
run under the real torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel

from bdlora import BDLoraConfig, apply_bdlora, parallelize, save_adapter
from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.parallel.mesh import CALL_TIMEOUT_ENV, MissingRanksError
from tests.conftest import logits, randomize_lora_b, tiny_model
from tests.distributed import run_distributed
from tests.test_tp import gathered_grads

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(rank=8, alpha=16, nblocks=2, patterns={"down_proj": {"rank": 16}})
IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(11))


def tp_mesh():
    return build_mesh(ParallelDims(dist.get_world_size(), tp=dist.get_world_size()))


def adapted(model, **overrides):
    torch.manual_seed(0)
    apply_bdlora(model, BDLoraConfig(**{**CONFIG, **overrides}))
    randomize_lora_b(model)
    return model


# --- rank-0-only calls ---------------------------------------------------------------------------


def rank0_saves_unsharded(out_dir: str) -> torch.Tensor:
    """The usual DP pattern: every rank holds the whole model, only rank 0 saves."""
    model = adapted(tiny_model()).eval()
    if dist.get_rank() == 0:
        save_adapter(model, out_dir)
    return logits(model, IDS)


def test_rank0_only_save_of_an_unsharded_model_returns(tmp_path):
    results = run_distributed(rank0_saves_unsharded, 2, str(tmp_path), timeout=120)
    peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, IDS), results[0], atol=1e-5, rtol=1e-5)


def rank0_saves_sharded(out_dir: str, timeout: str) -> tuple[str, float] | None:
    os.environ[CALL_TIMEOUT_ENV] = timeout
    model = adapted(parallelize(tiny_model(), tp_mesh()))
    if dist.get_rank() != 0:
        return None  # this rank never calls save_adapter
    start = time.monotonic()
    try:
        save_adapter(model, out_dir)
    except MissingRanksError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_save_on_some_ranks_of_a_sharded_model_fails_in_bounded_time(tmp_path):
    message, waited = run_distributed(rank0_saves_sharded, 2, str(tmp_path / "out"), "3", timeout=120)[0]
    assert "save_adapter: rank(s) [1] of 2 did not call it within 3 s" in message
    assert "every rank" in message
    assert 3 <= waited < 60
    assert not (tmp_path / "out").exists()


# --- base_stats init and activation checkpointing at TP 2 ----------------------------------------


def full_factors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in bdlora_layers(model):
        out[f"{name}.A"], out[f"{name}.B"] = layer.full_factors("default")
    return out


def base_stats_factors() -> dict[str, torch.Tensor]:
    model = parallelize(tiny_model(), tp_mesh())
    torch.manual_seed(0)
    apply_bdlora(model, BDLoraConfig(**CONFIG, init="base_stats"))
    return full_factors(model)


def test_base_stats_init_at_tp2_equals_tp1():
    reference = tiny_model()
    torch.manual_seed(0)
    apply_bdlora(reference, BDLoraConfig(**CONFIG, init="base_stats"))
    expected = full_factors(reference)
    for got in run_distributed(base_stats_factors, 2):
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-7, rtol=1e-6, msg=name)
    # base_stats, not another init: A's spread follows the base weight's (std 0.2 in tiny models)
    a = expected["model.layers.0.self_attn.q_proj.A"]
    assert 0.1 < float(a.std()) < 0.4


def checkpointed_step(activation_checkpointing: bool) -> dict:
    model = adapted(tiny_model().train())  # factors drawn unsharded, then sharded by parallelize
    parallelize(model, tp_mesh(), activation_checkpointing=activation_checkpointing)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return {"loss": out.loss.detach(), "grads": gathered_grads(model), "q_proj_calls": len(calls)}


def test_activation_checkpointing_at_tp2_equals_tp1():
    reference = adapted(tiny_model().train())
    out = reference(input_ids=IDS, labels=IDS)
    out.loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for res in run_distributed(checkpointed_step, 2, True):
        assert res["q_proj_calls"] == 2, "the decoder layer was not recomputed in backward"
        torch.testing.assert_close(res["loss"], out.loss.detach(), atol=1e-6, rtol=1e-6)
        assert res["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(res["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


# --- the example script, as a user runs it -------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("tiny-llama", seed=3).save_pretrained(path)
    return path


def run_example(nproc: int, model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    script = [str(ROOT / "examples" / "train_tp.py"), "--model", str(model_dir), "--out", str(out), *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*launcher, *script] if nproc > 1 else [sys.executable, *script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def test_example_script_under_torchrun_matches_one_process(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_example(1, model_dir, tmp_path / "tp1")
    tp2 = run_example(2, model_dir, tmp_path / "tp2")
    assert "adapter written to" in tp2.stdout
    run_example(2, model_dir, tmp_path / "dp2", "--tp", "1")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = logits(PeftModel.from_pretrained(base, str(tmp_path / "tp1")).eval(), IDS)
    assert (
        reference - logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), IDS)
    ).abs().max() > 1e-3
    for run in ("tp2", "dp2"):
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        got = logits(PeftModel.from_pretrained(base, str(tmp_path / run)).eval(), IDS)
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4, msg=run)
