"""A saved adapter whose blocks a BD-LoRA-sharded model cannot hold whole on each rank: a dense
LoRA (PEFT-trained, or bdlora's ``peft-lora`` export), or nblocks not a multiple of TP. Loading it
there is refused with the fix; the fix (S-LoRA sharding) gives PEFT's unsharded logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model

from bdlora import BDLoraConfig, BDLoraConfigError, apply_bdlora, load_adapter, save_adapter, state_of
from bdlora.model import adapters_of
from bdlora.parallel.loading import from_pretrained
from bdlora.parallel.mesh import ParallelDims, build_mesh
from bdlora.parallel.sharding import check_model_tp
from tests.conftest import LINEAR_LEAVES, logits, randomize_lora_b, tiny_model
from tests.distributed import run_distributed

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
DENSE = ("peft-trained", "peft-lora")  # PEFT's own LoRA; bdlora's BD-LoRA exported dense
BLOCK_DIAGONAL = "peft-bdlora"  # nblocks=2


def dense_refusal(directory: str) -> str:
    return (
        f"adapter {directory} is dense LoRA (no block-diagonal factor); a BD-LoRA-sharded model holds "
        f"whole blocks per rank, which a dense factor has not: load it on a model sharded the S-LoRA "
        f"way: bdlora.from_pretrained(..., sharding='slora', adapter_dir={directory}) (its forward adds "
        f"S-LoRA's (tokens, r) collectives), or at TP 1"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("tiny-llama", seed=5).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """Adapter kind -> (its directory, PEFT's logits with it on the unsharded model)."""
    root = tmp_path_factory.mktemp("adapters")
    trained = get_peft_model(
        tiny_model("tiny-llama", seed=5), LoraConfig(r=8, lora_alpha=16, target_modules=list(LINEAR_LEAVES))
    )
    randomize_lora_b(trained)
    trained.save_pretrained(root / "peft-trained")
    bd = apply_bdlora(tiny_model("tiny-llama", seed=5), BDLoraConfig(rank=8, alpha=16, nblocks=2))
    randomize_lora_b(bd)
    save_adapter(bd, root / "peft-lora", format="peft-lora")
    save_adapter(bd, root / BLOCK_DIAGONAL, format="peft-bdlora")
    out = {}
    for kind in (*DENSE, BLOCK_DIAGONAL):
        reference = PeftModel.from_pretrained(tiny_model("tiny-llama", seed=5), root / kind)
        out[kind] = (str(root / kind), logits(reference, IDS))
    return out


def error_of(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except BDLoraConfigError as err:
        return str(err)
    return "no error"


def slora_logits(model_dir: str, adapter_dir: str, mesh) -> torch.Tensor:
    model = from_pretrained(model_dir, mesh=mesh, sharding="slora", adapter_dir=adapter_dir).eval()
    return logits(model, IDS)


def load_at_tp2(model_dir: str, dense_dirs: list[str], bd_dir: str) -> dict:
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=2))
    out = {}
    for directory in dense_dirs:
        model = from_pretrained(model_dir, mesh=mesh)
        out[directory] = {
            "load_adapter": error_of(load_adapter, model, directory),
            "left_behind": list(adapters_of(model)),
            "from_pretrained": error_of(from_pretrained, model_dir, mesh=mesh, adapter_dir=directory),
            "slora": slora_logits(model_dir, directory, mesh),
        }
    out[bd_dir] = {"slora": slora_logits(model_dir, bd_dir, mesh)}
    return out


@pytest.mark.slow
def test_dense_adapter_refused_on_bdlora_sharding_and_loads_as_advised(model_dir, adapters):
    dense_dirs = [adapters[kind][0] for kind in DENSE]
    bd_dir, bd_expected = adapters[BLOCK_DIAGONAL]
    for result in run_distributed(load_at_tp2, 2, model_dir, dense_dirs, bd_dir):
        for kind in DENSE:
            directory, expected = adapters[kind]
            got = result[directory]
            assert got["load_adapter"] == dense_refusal(directory)
            assert got["left_behind"] == []  # refused before any module changed
            # from_pretrained checks the adapter's plan before reading: the same fix, named
            assert "dense LoRA (no block-diagonal factor)" in got["from_pretrained"]
            assert "sharding='slora', adapter_dir=" in got["from_pretrained"]
            torch.testing.assert_close(got["slora"], expected, atol=1e-5, rtol=0)
        # a block-diagonal adapter on S-LoRA sharding: expanded to the dense LoRA it equals
        torch.testing.assert_close(result[bd_dir]["slora"], bd_expected, atol=1e-5, rtol=0)


@dataclass
class ShardedRecord:
    """A BD-LoRA-sharded model's parallel record, without processes: the refusal needs no more."""

    tp_size: int
    sharding: str = "bdlora"

    def call_on_every_rank(self, op, fn, *args):
        return fn(*args)


def test_bdlora_adapter_names_the_tp_degrees_it_loads_at(adapters):
    directory = adapters[BLOCK_DIAGONAL][0]
    model = tiny_model("tiny-llama", seed=5)
    state_of(model, create=True).parallel = ShardedRecord(tp_size=4)
    message = error_of(load_adapter, model, directory)
    assert message == (
        f"adapter {directory} is BD-LoRA with nblocks=2; a BD-LoRA-sharded model holds whole blocks "
        f"per rank, so it loads BD-LoRA-sharded at TP 1, 2 (the degrees dividing 2), not at TP 4. At "
        f"TP 4, load it on a model sharded the S-LoRA way: bdlora.from_pretrained(..., "
        f"sharding='slora', adapter_dir={directory}) (expanded to the dense LoRA it equals; its forward "
        f"adds S-LoRA's (tokens, r) collectives)"
    )
    assert adapters_of(model) == {}


@pytest.mark.parametrize("nblocks", [1, 2])
def test_plan_check_gives_the_fix_for_a_new_or_saved_adapter(nblocks):
    model = apply_bdlora(tiny_model("tiny-llama"), BDLoraConfig(rank=8, nblocks=nblocks))
    message = error_of(check_model_tp, model, 4)
    assert message.startswith(
        "nblocks=1 is dense LoRA" if nblocks == 1 else "nblocks=2 is not divisible by the TP degree 4"
    )
    assert "nblocks among multiples of 4 (e.g. 4, 8)" in message
    assert "bdlora.from_pretrained(..., sharding='slora', adapter_dir=DIR)" in message
    assert message.endswith("at TP 1" if nblocks == 1 else "at a TP degree dividing nblocks=2")
