"""Serving without vLLM: the per-rank slicing the plugin applies, its refusals, the launcher's
arguments, and exports free of GGUF quantisation (vLLM itself runs in ``test_serve_vllm.py``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from bdlora.cli import main as cli_main
from bdlora.layers import expand_block_diag
from bdlora.serve.launch import serve_args, vllm_max_lora_rank
from bdlora.serve.shards import (
    BlockLayoutError,
    check_shards,
    column_shard,
    local_rank_dim,
    packed_nblocks,
    row_shard,
)
from bdlora.serve.vllm_plugin import UnsupportedVLLMError, check_adapter, check_version
from bdlora.train.checkpoint import write_manifest
from bdlora.train.config import ModelConfig
from bdlora.train.export import export
from bdlora.train.modeling import drop_gguf_quantization, resolve_model_dir
from tests.test_export import path_run, preset_run  # noqa: F401 - module fixtures reused

D_IN, D_OUT, RANK, NBLOCKS = 48, 32, 8, 4
GGUF = {"quant_method": "gguf", "bits": 4}


def factors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((RANK, D_IN), (D_OUT, RANK)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_shards_give_each_rank_its_output_rows(tp):
    """Shard i's ``B_i A_i`` is the dense delta's output rows i: nothing comes from other ranks."""
    a, _ = factors()
    b_packed = torch.randn(D_OUT, RANK // NBLOCKS, dtype=torch.float64)  # PEFT's packed B
    delta = expand_block_diag(b_packed, NBLOCKS) @ a  # (d_out, d_in)
    for i in range(tp):
        a_i, b_i = column_shard(a, b_packed, NBLOCKS, i, tp)
        assert a_i.shape == (RANK // tp, D_IN) and b_i.shape == (D_OUT // tp, RANK // tp)
        assert_close(b_i @ a_i, delta.chunk(tp, 0)[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_shards_sum_to_the_delta(tp):
    """The row layer's partials ``B_i A_i x_i`` over the input shards sum to ``B A x`` (the base's
    own all-reduce adds them)."""
    _, b = factors()
    a_packed = torch.randn(RANK, D_IN // NBLOCKS, dtype=torch.float64)  # PEFT's packed A
    x = torch.randn(3, D_IN, dtype=torch.float64)
    want = x @ (b @ expand_block_diag(a_packed, NBLOCKS)).T
    got = torch.zeros_like(want)
    for i in range(tp):
        a_i, b_i = row_shard(a_packed, b, NBLOCKS, i, tp)
        assert a_i.shape == (RANK // tp, D_IN // tp) and b_i.shape == (D_OUT, RANK // tp)
        got += x.chunk(tp, 1)[i] @ (b_i @ a_i).T
    assert_close(got, want, rtol=0, atol=1e-12)


def test_block_counts_and_rank_buffers():
    assert packed_nblocks("q", 2, 8) == 4 and packed_nblocks("q", 8, 8) == 1
    with pytest.raises(BlockLayoutError, match="width 3 neither matches the layer's 8"):
        packed_nblocks("q", 3, 8)
    assert local_rank_dim(16, 3) == 6 and local_rank_dim(8, 4) == 2
    with pytest.raises(BlockLayoutError, match="nblocks=2 cannot be served at tensor-parallel degree 4"):
        check_shards("layers.0.o_proj", 2, 4)


def test_plugin_refuses_other_vllm_versions_naming_the_supported_ones():
    check_version("0.32.0")
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM 0\.32\.0 .* this is vLLM 0\.33\.1"):
        check_version("0.33.1")


def test_adapter_checks_before_loading():
    bd = {"use_bdlora": {"nblocks": 4, "target_modules_bd_a": ["o_proj"]}}
    check_adapter("a", bd, tp=2, fully_sharded=False)
    check_adapter("dense", {"r": 8}, tp=3, fully_sharded=True)  # dense LoRA: vLLM's own business
    with pytest.raises(BlockLayoutError, match="nblocks=4 cannot be served at tensor-parallel degree 3"):
        check_adapter("a", bd, tp=3, fully_sharded=False)
    with pytest.raises(BlockLayoutError, match="fully_sharded_loras=True"):
        check_adapter("a", bd, tp=2, fully_sharded=True)


def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_the_adapter():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 12, 300)] == [1, 8, 8, 16, 320]


def test_serve_args_name_the_base_and_adapter(preset_run, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(preset_run.run_dir, run_dir)
    with pytest.raises(Exception, match="has no adapter/"):
        serve_args(run_dir)
    export(run_dir, "peft-bdlora", run_dir / "adapter")
    args = serve_args(run_dir, tp=2)
    base = run_dir / "serving" / "base"
    assert args[:4] == ["--model", str(base), "--enable-lora", "--lora-modules"]
    assert args[4] == f"run={run_dir / 'adapter'}"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert json.loads((base / "config.json").read_text())["eos_token_id"] == 0  # the byte tokenizer's
    with pytest.raises(Exception, match="nblocks=2, which serves at a tensor-parallel degree dividing 2"):
        serve_args(run_dir, tp=4)


def test_smollm2_cache_drops_its_gguf_quantization(tmp_path):
    cache = tmp_path / "smollm2-135m-instruct"
    cache.mkdir()
    (cache / "model.safetensors").write_bytes(b"")
    (cache / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": GGUF}))
    assert resolve_model_dir(ModelConfig(source="smollm2", cache_dir=str(tmp_path)), is_main=True) == cache
    assert json.loads((cache / "config.json").read_text()) == {"model_type": "llama"}
    assert not drop_gguf_quantization(cache)


def test_merged_export_carries_no_gguf_quantization(path_run, tmp_path, capsys):  # noqa: F811
    model_dir = tmp_path / "model"
    shutil.copytree(path_run.model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": GGUF}))
    drop_gguf_quantization(path_run.model_dir)  # unchanged: it had none
    run_dir = tmp_path / "run"
    shutil.copytree(path_run.run_dir, run_dir)
    state_path = next(run_dir.glob("checkpoints/*/trainer_state.json"))
    state = json.loads(state_path.read_text())
    state["config"]["model"]["path"] = str(model_dir)
    state_path.write_text(json.dumps(state))
    write_manifest(state_path.parent)
    assert cli_main(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "out")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert "loads in: transformers" in capsys.readouterr().out
