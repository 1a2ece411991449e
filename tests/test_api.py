"""The public API as users reach it, without a process group (tier 1): layering, the parallel
layout's placement rules, and what ``save_pretrained`` does on an adapted model."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import bdlora
from bdlora import BDLoraConfig, SavePretrainedError, apply_bdlora, merge_and_unload, parallelize
from bdlora.cli import main as cli_main
from bdlora.parallel.comm import TPGroup
from bdlora.parallel.placement import (
    BlockBoundary,
    BlockSpec,
    TPPlacementError,
    activation_argument,
    plan_blocks,
)
from bdlora.parallel.sharding import check_model_tp
from bdlora.roles import Role
from tests.conftest import logits, randomize_lora_b, tiny_model

PACKAGE = Path(bdlora.__file__).parent
CORE = ("bdlora.config", "bdlora.layers", "bdlora.plan", "bdlora.model", "bdlora.peft_io", "bdlora.state")
PUBLIC = (
    "from_pretrained",
    "parallelize",
    "apply_bdlora",
    "save_adapter",
    "load_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
)
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "all_to_all",
    "send",
    "recv",
    "reduce",
    "gather",
    "scatter",
}


def test_core_imports_without_the_trainer():
    """The core package works with ``bdlora.train`` (and Hydra) unimportable."""
    code = (
        "import sys\n"
        "sys.modules['bdlora.train'] = None\n"
        "sys.modules['hydra'] = None\n"
        f"import {', '.join(CORE)}\n"
        "import bdlora\n"
        "assert 'bdlora.train' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _distributed_calls(path: Path) -> list[str]:
    """Collectives called in a module: ``dist.<op>(...)`` / ``torch.distributed.<op>(...)``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") and node.func.attr in COLLECTIVES:
                calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {owner}.{node.func.attr}")
    return calls


def test_every_collective_is_issued_from_bdlora_parallel():
    outside = [
        call
        for path in sorted(PACKAGE.rglob("*.py"))
        if "parallel" not in path.relative_to(PACKAGE).parts
        for call in _distributed_calls(path)
    ]
    inside = [
        call for path in sorted((PACKAGE / "parallel").rglob("*.py")) for call in _distributed_calls(path)
    ]
    assert outside == []
    assert inside, "the scan found no collective at all: it is not looking"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_api_says_which_ranks_call_it(name):
    doc = getattr(bdlora, name).__doc__ or ""
    assert "rank" in doc.lower(), f"bdlora.{name}'s docstring does not say which ranks must call it"


def test_save_pretrained_on_an_adapted_model_raises_and_writes_nothing(tmp_path):
    model = apply_bdlora(tiny_model(), BDLoraConfig(rank=8, nblocks=2))
    with pytest.raises(SavePretrainedError, match=r"save_adapter.*merge_and_unload"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_pretrained_on_a_parallelized_model_without_adapter_raises(tmp_path):
    model = parallelize(tiny_model(), sharding="slora")
    apply_bdlora(model, BDLoraConfig(rank=8))
    with pytest.raises(SavePretrainedError):
        model.save_pretrained(tmp_path)


def test_merge_and_unload_saves_a_checkpoint_transformers_loads(tmp_path, input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig(rank=8, nblocks=2))
    randomize_lora_b(model)
    adapted = logits(model, input_ids)
    merge_and_unload(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, input_ids), adapted, atol=1e-5, rtol=1e-5)
    assert not hasattr(reloaded, "bdlora_state")
    assert (adapted - logits(tiny_model(), input_ids)).abs().max() > 1e-3  # the adapter was merged in


def test_state_record_is_one_documented_object():
    model = tiny_model()
    assert bdlora.state_of(model).adapters == {}  # reading creates nothing
    assert not hasattr(model, "bdlora_state")
    apply_bdlora(model, BDLoraConfig(rank=8, nblocks=2))
    state = model.bdlora_state
    assert isinstance(state, bdlora.BDLoraState) and list(state.adapters) == ["default"]
    assert state.parallel is None and not state.sharded
    parallel = bdlora.state_of(parallelize(tiny_model())).parallel
    assert (parallel.sharding, parallel.tp_size, parallel.dp_size) == ("bdlora", 1, 1)


# --- f and g placement from the TP plan ---------------------------------------------------------


def test_blocks_come_from_the_tp_plan():
    blocks, _ = check_model_tp(tiny_model(), 2)
    assert blocks[:2] == [
        BlockSpec(
            "model.layers.0.self_attn",
            tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),
            "model.layers.0.self_attn.o_proj",
        ),
        BlockSpec(
            "model.layers.0.mlp",
            ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
            "model.layers.0.mlp.down_proj",
        ),
    ]


def test_column_layers_under_the_decoder_layer_are_an_error_naming_it():
    """Column and row layers sharing the decoder layer as parent: which row closes which? Refused."""
    flat = [
        ("model.layers.0.q_proj", Role.COLUMN),
        ("model.layers.0.o_proj", Role.ROW),
        ("model.layers.0.up_proj", Role.COLUMN),
        ("model.layers.0.down_proj", Role.ROW),
    ]
    with pytest.raises(TPPlacementError, match=r"module 'model\.layers\.0' holds 2 row-parallel layers"):
        plan_blocks(flat)


def test_a_block_without_its_row_layer_is_an_error_naming_it():
    model = tiny_model()
    plan = dict(model.config.base_model_tp_plan)
    del plan["layers.*.self_attn.o_proj"]
    model.config.base_model_tp_plan = plan
    with pytest.raises(TPPlacementError, match=r"under module 'model\.layers\.0\.self_attn' have no row"):
        check_model_tp(model, 2)
    with pytest.raises(TPPlacementError, match=r"model\.layers\.0\.self_attn"):
        parallelize(model, _FakeMesh(2))


def test_block_boundary_finds_the_activation_argument_or_names_the_module():
    class ByName(nn.Module):
        def forward(self, position_ids, hidden_states, mask=None):
            return hidden_states

    class NoPositional(nn.Module):
        def forward(self, *, x):
            return x

    assert activation_argument(ByName(), "blk") == (1, "hidden_states")
    assert activation_argument(nn.Linear(2, 2), "blk") == (0, "input")
    with pytest.raises(TPPlacementError, match=r"module 'blk' \(NoPositional\) takes no positional"):
        activation_argument(NoPositional(), "blk")

    class Block(nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.o, self.residual = nn.Linear(3, 3), residual

        def forward(self, position_ids, hidden_states):
            out = self.o(hidden_states)
            return out + hidden_states if self.residual else out

    x = torch.ones(2, 3)
    for residual in (False, True):
        block, holder = Block(residual), nn.Module()
        holder.blk = block
        BlockBoundary(BlockSpec("blk", ("blk.q",), "blk.o"), holder, TPGroup(None))
        if residual:  # g would sum the residual too
            with pytest.raises(TPPlacementError, match=r"module 'blk' returns more than .* 'blk\.o'"):
                block(None, x)
            continue
        assert torch.equal(block(None, x), block.o(x))  # f and g are identities in a world of one
        assert torch.equal(block(position_ids=None, hidden_states=x), block.o(x))
        with pytest.raises(TPPlacementError, match=r"module 'blk' was called without .* 'hidden_states'"):
            block(position_ids=None)


def test_plan_tp_prints_where_f_and_g_run(capsys):
    assert cli_main(["plan", "--model", "tiny-llama", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{0-1}.self_attn  f -> q_proj, k_proj, v_proj  g <- o_proj" in out
    assert "model.layers.{0-1}.mlp        f -> gate_proj, up_proj      g <- down_proj" in out


def test_plan_rejects_a_non_positive_tp(capsys):
    assert cli_main(["plan", "--model", "tiny-llama", "--tp", "0"]) == 2
    assert "--tp 0" in capsys.readouterr().err


class _FakeMesh:
    """Enough of a DeviceMesh for parallelize's up-front validation, which fails before any group is used."""

    mesh_dim_names = ("tp",)

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def get_group(self, name: str):
        return None

    def size(self, dim: int = 0) -> int:
        return self.tp


def test_an_adapted_model_still_pickles(input_ids):
    import pickle

    model = apply_bdlora(tiny_model(), BDLoraConfig(rank=8, nblocks=2))
    randomize_lora_b(model)
    copy = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(copy, input_ids), logits(model, input_ids))
    with pytest.raises(SavePretrainedError):
        copy.save_pretrained("unused")
