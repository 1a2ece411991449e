"""Switching adapters on a merged model: the base weights hold one adapter at a time.

Two adapters ``a`` and ``b`` with different B; ``a`` merged, then ``b`` activated (or merged, or
exported): the model must compute ``b`` alone, at TP 1 and at TP 2, and say that it unmerged ``a``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from bdlora import BDLoraConfig, apply_bdlora, merge_adapter, merge_and_unload, parallelize, set_adapter
from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh
from tests.conftest import logits, randomize_lora_b, tiny_model
from tests.distributed import run_distributed

CONFIG = dict(rank=8, alpha=16, nblocks=2)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
TOL = dict(atol=1e-5, rtol=1e-5)
UNMERGED_A = r"adapter\(s\) \['a'\] were merged into the base weights"


def two_adapters() -> torch.nn.Module:
    """A tiny model with adapters ``a`` (active) and ``b``, their B drawn from different seeds."""
    model = tiny_model().eval()
    torch.manual_seed(0)
    apply_bdlora(model, BDLoraConfig(**CONFIG), "a")
    apply_bdlora(model, BDLoraConfig(**CONFIG), "b")
    randomize_lora_b(model, seed=1, adapter="a")
    randomize_lora_b(model, seed=2, adapter="b")
    return model


def alone(model: torch.nn.Module, adapter: str) -> torch.Tensor:
    set_adapter(model, adapter)
    return logits(model, IDS)


def merged_names(model: torch.nn.Module) -> set[str]:
    return {name for _, layer in bdlora_layers(model) for name in layer.merged}


def test_the_two_adapters_differ():
    model = two_adapters()
    assert (alone(model, "a") - alone(model, "b")).abs().max() > 0.05


def test_activating_b_after_merging_a_unmerges_a_with_a_warning():
    model = two_adapters()
    expected = alone(model, "b")
    set_adapter(model, "a")
    merge_adapter(model)
    with pytest.warns(UserWarning, match=rf"set_adapter\('b'\): {UNMERGED_A}"):
        set_adapter(model, "b")
    assert merged_names(model) == set()
    torch.testing.assert_close(logits(model, IDS), expected, **TOL)


def test_merging_b_while_a_is_merged_unmerges_a_with_a_warning():
    model = two_adapters()
    expected = alone(model, "b")
    set_adapter(model, "a")
    merge_adapter(model)
    with pytest.warns(UserWarning, match=rf"merge_adapter: {UNMERGED_A}"):
        merge_adapter(model, "b")
    assert merged_names(model) == {"b"}
    assert {layer.active_adapter for _, layer in bdlora_layers(model)} == {"b"}
    torch.testing.assert_close(logits(model, IDS), expected, **TOL)


def test_merge_and_unload_after_switching_exports_b_alone():
    reference = two_adapters()
    set_adapter(reference, "b")
    expected = merge_and_unload(reference).state_dict()
    model = two_adapters()
    merge_adapter(model, "a")
    with pytest.warns(UserWarning, match=UNMERGED_A):
        set_adapter(model, "b")
    got = merge_and_unload(model).state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)


def test_switching_without_a_merge_does_not_warn():
    model = two_adapters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_adapter(model, "b")
        merge_adapter(model)
        set_adapter(model, "b")  # the merged adapter itself: stays merged
    assert merged_names(model) == {"b"}


# --- TP 2 ----------------------------------------------------------------------------------------


def switch_at_tp2() -> dict:
    model = two_adapters()  # factors drawn unsharded; parallelize keeps each rank's shards
    parallelize(model, build_mesh(ParallelDims(dist.get_world_size(), tp=2)))
    out = {"b_alone": alone(model, "b")}
    set_adapter(model, "a")
    merge_adapter(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_adapter(model, "b")
    out["warnings"] = [str(w.message) for w in caught]
    out["merged"] = merged_names(model)
    out["switched"] = logits(model, IDS)
    return out


@pytest.mark.slow
def test_activating_b_after_merging_a_at_tp2_gives_b_alone():
    expected = alone(two_adapters(), "b")
    for rank, res in enumerate(run_distributed(switch_at_tp2, 2, timeout=180)):
        assert len(res["warnings"]) == 1 and "set_adapter('b')" in res["warnings"][0], rank
        assert res["merged"] == set(), rank
        torch.testing.assert_close(res["switched"], res["b_alone"], **TOL, msg=f"rank {rank}")
        torch.testing.assert_close(res["switched"], expected, **TOL, msg=f"rank {rank}")
