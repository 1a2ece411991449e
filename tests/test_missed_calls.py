"""After an every-rank call is missed, later calls fail plainly on every rank (tier 2, gloo).

Once one rank skips an every-rank call the ranks' call counts differ for good; the next calls must
neither hang, nor die in gloo, nor blame a rank that did call: every rank, including the one that
skipped, gets ``OutOfStepError`` saying the process group must be restarted.
"""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from bdlora import BDLoraConfig, apply_bdlora, merge_adapter, parallelize, set_adapter, unmerge_adapter
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.parallel.mesh import CALL_TIMEOUT_ENV, MissingRanksError, OutOfStepError
from tests.conftest import tiny_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

TIMEOUT = 2  # seconds a rank waits in an every-rank call for the others
RESTART = "the process group is no longer usable for bdlora's collective calls: restart"


def sharded_model():
    os.environ[CALL_TIMEOUT_ENV] = str(TIMEOUT)
    model = parallelize(tiny_model(), build_mesh(ParallelDims(dist.get_world_size(), tp=2)))
    apply_bdlora(model, BDLoraConfig(rank=8, nblocks=2))
    return model


def outcome(fn, *args) -> tuple[str, str, float]:
    """(error class, message, seconds) of ``fn(*args)``; ``("", "", s)`` when it returns."""
    start = time.monotonic()
    try:
        fn(*args)
    except MissingRanksError as err:
        return type(err).__name__, str(err), time.monotonic() - start
    return "", "", time.monotonic() - start


def rank1_skips_then_both_call() -> dict:
    """Rank 1 skips a ``set_adapter`` that rank 0 makes; once rank 0 has given up, both go on."""
    model = sharded_model()
    out = {}
    if dist.get_rank() == 0:
        out["missed"] = outcome(set_adapter, model, "default")
    dist.barrier()  # rank 1 makes its next call only after rank 0's has failed
    out["next"] = outcome(set_adapter, model, "default")
    out["later"] = outcome(merge_adapter, model)
    return out


def test_calls_after_a_missed_call_fail_plainly_on_every_rank():
    results = run_distributed(rank1_skips_then_both_call, 2, timeout=120)
    kind, message, _ = results[0]["missed"]
    assert kind == "MissingRanksError"
    assert f"set_adapter: rank(s) [1] of 2 did not call it within {TIMEOUT} s" in message
    assert "rank 1's last every-rank call is #1 (apply_bdlora)" in message
    assert RESTART in message
    for rank, res in enumerate(results):
        for call, op in (("next", "set_adapter"), ("later", "merge_adapter")):
            kind, message, waited = res[call]
            assert kind == OutOfStepError.__name__, (rank, call, message)
            assert message.startswith(f"{op}: {RESTART}"), (rank, call, message)
            assert "did not call it" not in message, (rank, call, message)
            assert waited < TIMEOUT, (rank, call, waited)  # refused at once, not after a wait


def rank1_skips_and_goes_on() -> dict:
    """Rank 1 skips ``set_adapter`` and goes straight to the next call, ``merge_adapter``."""
    model = sharded_model()
    out = {}
    if dist.get_rank() == 0:
        out["skipped"] = outcome(set_adapter, model, "default")
    out["next"] = outcome(merge_adapter, model)
    out["later"] = outcome(unmerge_adapter, model)
    return out


def test_a_call_skipped_before_another_fails_as_a_mismatch_on_every_rank():
    results = run_distributed(rank1_skips_and_goes_on, 2, timeout=120)
    # call #2 is set_adapter on rank 0 and merge_adapter on rank 1: both see it, neither waits
    first = [results[0]["skipped"], results[1]["next"]]
    for rank, (kind, message, waited) in enumerate(first):
        assert kind == "MissingRanksError", (rank, message)
        assert "every-rank call #2: rank 0 made set_adapter, rank 1 made merge_adapter" in message
        assert RESTART in message
        assert waited < TIMEOUT, (rank, waited)
    for rank, calls in ((0, ("next", "later")), (1, ("later",))):
        for call in calls:
            kind, message, _ = results[rank][call]
            assert kind == OutOfStepError.__name__, (rank, call, message)
            assert RESTART in message
