"""Sharded loading, gathered and sharded saving, resume at another TP degree, TP errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from bdlora import BDLoraConfig, BDLoraConfigError, apply_bdlora, load_adapter, save_adapter
from bdlora.model import adapter_parameters
from bdlora.parallel import parallelize
from bdlora.parallel.checkpoint import load_sharded_adapter, save_sharded_adapter
from bdlora.parallel.loading import from_pretrained
from bdlora.parallel.mesh import ParallelDims, build_mesh, on_all_ranks
from bdlora.parallel.sharding import check_model_tp, tp_layouts
from bdlora.presets import build_model, preset_config
from tests.conftest import randomize_lora_b, tiny_model
from tests.distributed import run_distributed

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("tiny-llama", seed=5).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = build_model(model_dir)
    apply_bdlora(model, BDLoraConfig(rank=8, alpha=8, nblocks=4, patterns={"down_proj": {"rank": 16}}))
    randomize_lora_b(model)
    save_adapter(model, path)
    return str(path)


def mesh_for(tp: int):
    return build_mesh(ParallelDims(dist.get_world_size(), tp=tp))


class CountingFile:
    """A ``safe_open`` handle that adds up the bytes of every tensor or slice read through it."""

    def __init__(self, handle, requested: dict[str, int]) -> None:
        self.handle, self.requested = handle, requested

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._count(key, self.handle.get_tensor(key))

    def get_slice(self, key: str):
        view, count = self.handle.get_slice(key), self._count

        class Slice:
            def get_shape(self):
                return view.get_shape()

            def __getitem__(self, index):
                return count(key, view[index])

        return Slice()

    def _count(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        self.requested[key] = self.requested.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor


def load_sharded(model_dir: str, adapter_dir: str | None, tp: int, **layout) -> dict:
    from bdlora.parallel import conversion  # every checkpoint read goes through its index

    requested: dict[str, int] = {}
    real_open = conversion.safe_open
    conversion.safe_open = lambda path, framework: CountingFile(
        real_open(path, framework=framework), requested
    )
    model = from_pretrained(model_dir, adapter_dir=adapter_dir, mesh=mesh_for(tp), **layout).eval()
    with torch.no_grad():
        return {"logits": model(input_ids=IDS % model.config.vocab_size).logits, "requested": requested}


def load_vocab_parallel(model_dir: str) -> dict:
    return load_sharded(model_dir, None, dist.get_world_size(), vocab_parallel=True, sequence_parallel=True)


def train_and_save_sharded(model_dir: str, ckpt_dir: str, tp: int) -> torch.Tensor:
    config = BDLoraConfig(rank=8, alpha=16, nblocks=4, patterns={"q_proj": {"rank": 4}})
    model = from_pretrained(model_dir, config, mesh=mesh_for(tp)).train()
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    save_sharded_adapter(model, ckpt_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def resume_sharded(model_dir: str, ckpt_dir: str, tp: int) -> torch.Tensor:
    model = from_pretrained(model_dir, mesh=mesh_for(tp)).eval()
    load_sharded_adapter(model, ckpt_dir)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.slow
def test_from_pretrained_reads_only_local_slices(model_dir, adapter_dir):
    from safetensors import safe_open

    reference = build_model(model_dir)
    load_adapter(reference, adapter_dir)
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    sharded = {f"{name}.weight" for name in tp_layouts(reference)}
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    stored = {k: 4 * int(torch.Size(shape).numel()) for k, shape in sizes.items()}  # fp32
    results = run_distributed(load_sharded, 2, model_dir, adapter_dir, 2)
    for res in results:
        torch.testing.assert_close(res["logits"], expected, atol=1e-5, rtol=1e-5)
        # every TP-planned projection: exactly half of it; everything else (embedding, norms): whole
        assert res["requested"] == {k: v // 2 if k in sharded else v for k, v in stored.items()}
        assert sum(res["requested"].values()) < sum(stored.values())


@pytest.mark.slow
def test_vocab_parallel_loading_reads_only_its_rows(tmp_path):
    """A tied model whose vocabulary (250) TP 4 does not divide: rows 63 per rank, 61 on the last."""
    config = preset_config("tiny-llama")
    config.vocab_size, config.tie_word_embeddings = 250, True
    torch.manual_seed(4)
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = reference(input_ids=IDS % 250).logits
    row_bytes = 4 * config.hidden_size
    for rank, res in enumerate(run_distributed(load_vocab_parallel, 4, str(tmp_path))):
        torch.testing.assert_close(res["logits"], expected, atol=1e-5, rtol=1e-5)
        assert res["requested"]["model.embed_tokens.weight"] == (61 if rank == 3 else 63) * row_bytes
        assert "lm_head.weight" not in res["requested"]  # tied: never stored, never read


@pytest.mark.slow
def test_sharded_checkpoint_resumes_at_other_tp(model_dir, tmp_path):
    trained = run_distributed(train_and_save_sharded, 4, model_dir, str(tmp_path), 4)[0]
    assert len(list(tmp_path.glob("adapter-tp*-of-004.safetensors"))) == 4
    for world in (2, 1):
        resumed = run_distributed(resume_sharded, world, model_dir, str(tmp_path), world)
        for logits in resumed:
            torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)


def test_parallel_dims_validation():
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by tp=3.*\[1, 2, 4\]"):
        ParallelDims(4, tp=3)
    assert ParallelDims(8, tp=2).dp == 4


def test_tp_must_divide_heads_kv_heads_and_nblocks():
    qwen = tiny_model("tiny-qwen2")  # 4 heads, 2 KV heads
    with pytest.raises(BDLoraConfigError, match=r"num_key_value_heads=2.*\[1, 2\]"):
        check_model_tp(qwen, 4)
    llama = tiny_model("tiny-llama")
    with pytest.raises(BDLoraConfigError, match="num_attention_heads=4"):
        check_model_tp(llama, 3)
    apply_bdlora(llama, BDLoraConfig(rank=8, nblocks=2))
    with pytest.raises(BDLoraConfigError, match=r"nblocks=2 is not divisible by the TP degree 4"):
        check_model_tp(llama, 4)


def test_unsupported_tp_style_names_module_and_style():
    model = tiny_model("tiny-llama")
    model.config.base_model_tp_plan = {
        **model.config.base_model_tp_plan,
        "layers.*.mlp.gate_proj": "gather",
    }
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj.*'gather'"):
        check_model_tp(model, 2)


def test_single_rank_shard_is_identity(input_ids):
    model = tiny_model("tiny-llama")
    apply_bdlora(model, BDLoraConfig(rank=8, nblocks=2))
    randomize_lora_b(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    parallelize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected)


def fail_on_rank_one() -> str:
    def check():
        if dist.get_rank() == 1:
            raise FileNotFoundError("/data/missing.jsonl does not exist")
        return "fine"

    try:
        on_all_ranks(check)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.slow
def test_error_on_one_rank_stops_all_ranks():
    messages = run_distributed(fail_on_rank_one, 2)
    assert all("/data/missing.jsonl" in m for m in messages), messages
    assert messages[0].startswith("RankFailed: rank 1 failed")
