"""``bdlora.from_pretrained`` on every dense architecture, at TP 1 and TP 2 (tier 2).

One case per architecture, TP degree and check: the TP 2 ranks walk every architecture in one
launch and report each one's result or traceback (see ``tests/architectures.py``).
"""

from __future__ import annotations

import pytest
import torch

from tests import architectures as archs
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

CASES = [pytest.param(tp, arch, id=f"tp{tp}-{arch}") for tp in (1, 2) for arch in archs.ARCHS]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    return archs.save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def references(model_dirs) -> dict[str, dict]:
    """Per architecture: transformers' logits, and the single-process adapter run or its traceback."""
    return {
        arch: {"logits": archs.transformers_logits(d), "adapter": archs.capture(archs.reference, d)}
        for arch, d in model_dirs.items()
    }


@pytest.fixture(scope="module")
def tp1(model_dirs, tmp_path_factory) -> list[dict[str, dict | str]]:
    """Per rank (one here), per architecture: ``check_arch``'s results or the traceback."""
    return [archs.check_archs(model_dirs, str(tmp_path_factory.mktemp("adapters_tp1")))]


@pytest.fixture(scope="module")
def tp2(model_dirs, tmp_path_factory) -> list[dict[str, dict | str]]:
    adapter_root = str(tmp_path_factory.mktemp("adapters_tp2"))
    return run_distributed(archs.check_archs_tp, 2, model_dirs, adapter_root, 2)


def ok(outcome: dict | str, where: str) -> dict:
    """The outcome's results, or the test fails with the traceback that stopped it."""
    if isinstance(outcome, str):
        pytest.fail(f"{where}:\n{outcome}", pytrace=False)
    return outcome


def rank_results(request, tp: int, arch: str) -> list[dict]:
    ranks = request.getfixturevalue(f"tp{tp}")
    return [ok(outcomes[arch], f"tp{tp} rank {rank}") for rank, outcomes in enumerate(ranks)]


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, **archs.TOL, msg=lambda detail: f"{what}: {detail}")


def reference_of(request, arch: str) -> dict:
    return request.getfixturevalue("references")[arch]


@pytest.mark.parametrize(("tp", "arch"), CASES)
def test_zero_adapter_keeps_transformers_logits(request, tp, arch):
    expected = reference_of(request, arch)["logits"]
    for rank, res in enumerate(rank_results(request, tp, arch)):
        assert_close(res["zero_logits"], expected, f"rank {rank} logits")


@pytest.mark.parametrize(("tp", "arch"), CASES)
def test_adapter_matches_single_process(request, tp, arch):
    base_logits = reference_of(request, arch)["logits"]
    ref = ok(reference_of(request, arch)["adapter"], "single-process reference")
    assert (ref["logits"] - base_logits).abs().max() > 1e-2, "the random adapter changes nothing"
    for rank, res in enumerate(rank_results(request, tp, arch)):
        assert_close(res["loss"], ref["loss"], f"rank {rank} loss")
        assert_close(res["logits"], ref["logits"], f"rank {rank} logits")
        assert res["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert_close(res["grads"][name], grad, f"rank {rank} grad of {name}")


# PEFT 0.21.2 maps an adapter's target names through transformers' MoE weight conversion for
# DeepSeek-V3, so adapters on its dense MLP (gate/up/down_proj) do not load there (attention ones do,
# exactly); strict, so the case fails once PEFT loads them.
PEFT_MOE_RENAMING = pytest.mark.xfail(
    reason="PEFT 0.21.2 renames DeepSeek-V3's MLP targets through the MoE conversion", strict=True
)


@pytest.mark.parametrize(
    ("tp", "arch"),
    [
        pytest.param(tp, arch, id=f"tp{tp}-{arch}", marks=PEFT_MOE_RENAMING if arch == "deepseek_v3" else ())
        for tp in (1, 2)
        for arch in archs.ARCHS
    ],
)
def test_peft_loads_saved_adapter(model_dirs, request, tp, arch):
    results = rank_results(request, tp, arch)
    peft_logits = archs.peft_logits(model_dirs[arch], results[0]["adapter_dir"])
    for rank, res in enumerate(results):
        assert_close(peft_logits, res["eval_logits"], f"PEFT's logits against rank {rank}'s")
