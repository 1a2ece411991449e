"""Several adapters in one model: PEFT's mixed batches (``adapter_names``) and ``combine_adapters``.

``walk`` runs every case at one TP degree: in this process at TP 1, and on two gloo ranks at TP 2
(one launch). Mixed-batch rows are compared with models holding that adapter alone (``__base__``
rows with the base model), through ``forward`` and ``generate``, and their collectives with a
single-adapter forward's; the combined adapter with a float64 merge of the weighted deltas, with
PEFT's own ``add_weighted_adapter(..., combination_type="cat")``, and with PEFT loading it.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
from bdlora import BDLoraConfig, BDLoraConfigError, apply_bdlora, combine_adapters, parallelize
from bdlora.cli import main
from bdlora.layers import dense_factors
from bdlora.model import adapters_of, bdlora_layers
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.mesh import ParallelDims, build_mesh
from bdlora.train.config import ModelConfig
from tests.conftest import logits, tiny_model
from tests.distributed import run_distributed
from tests.moe_archs import ARCHS, TINY

ADAPTERS = {  # ranks and alphas differ per adapter and per module
    "a": dict(rank=8, alpha=16, nblocks=2, patterns={"q_proj": {"rank": 4, "alpha": 2}}),
    "b": dict(rank=4, alpha=8, nblocks=2, patterns={"down_proj": {"rank": 6, "alpha": 3}}),
    "c": dict(rank=4, alpha=4, nblocks=2, target_modules=["q_proj", "down_proj"]),  # fewer modules
    "d": dict(rank=8, alpha=8, nblocks=4),
}
NAMES = ["b", "__base__", "a", "c", "a"]  # one per row of ``batch()``
WEIGHTS = {"a": 0.7, "b": 0.3}
TOL = dict(atol=1e-5, rtol=0)
MOE_LINEARS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_ADAPTERS = {  # qwen2-MoE: attention, shared expert, every expert tensor; "gate": the router (TP 1)
    "e": dict(rank=8, alpha=16, target_modules=[*MOE_LINEARS, "gate"]),
    "f": dict(rank=4, alpha=4, target_modules=[*MOE_LINEARS, "gate"]),
    "g": dict(rank=4, alpha=8, target_modules=["o_proj", "down_proj"]),
}
MOE_NAMES = ["f", "__base__", "e", "g"]


def batch(rows: int = len(NAMES), seq: int = 8, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def randomize(model, name: str, seed: int) -> None:
    """Nonzero B drawn unsharded, so every TP degree holds the same adapter."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in bdlora_layers(model):
        if name in layer.lora_A:
            a, b = layer.full_factors(name)
            layer.set_factors(name, a, torch.randn(b.shape, generator=generator) * 0.1)


def add_adapters(model, names: str, settings: dict[str, dict], **extra):
    for seed, name in enumerate(settings):
        if name in names:
            torch.manual_seed(seed)
            apply_bdlora(model, BDLoraConfig(**{**settings[name], **extra}), name)
            randomize(model, name, 100 + seed)
    return model.eval()


def build(names: str, mesh=None, sharding: str = "bdlora"):
    """tiny-llama (parallelized over ``mesh``) holding the adapters ``names`` of ADAPTERS."""
    model = tiny_model("tiny-llama")
    if mesh is not None:
        parallelize(model, mesh, sharding=sharding)
    return add_adapters(model, names, ADAPTERS)


def build_moe(names: str, mesh=None):
    """A tiny qwen2-MoE holding the adapters ``names`` of MOE_ADAPTERS (routers adapted at TP 1 only:
    the TP plan does not shard them)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2_moe", **TINY, **ARCHS["qwen2_moe"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if mesh is not None:
        parallelize(model, mesh)
    settings = MOE_ADAPTERS
    if mesh is not None:
        settings = {
            n: {**s, "target_modules": [t for t in s["target_modules"] if t != "gate"]}
            for n, s in settings.items()
        }
    return add_adapters(model, names, settings, nblocks=4, target_parameters=["gate_up_proj", "down_proj"])


def error(fn, *args, **kwargs) -> str:
    """``fn``'s exception as 'Type: message' (a string, so it crosses processes)."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  (the message is the result)
        return f"{type(err).__name__}: {err}"
    return "no error"


def counted(model, group, **kwargs) -> tuple[torch.Tensor, dict]:
    """Logits of one forward and its TP collectives (ops and bytes)."""
    with torch.no_grad(), CommCounter({"tp": group}) as comm:
        out = model(**kwargs).logits
    summary = comm.summary().get("tp", {"ops": {}, "bytes": 0})
    return out, {"ops": summary["ops"], "bytes": summary["bytes"]}


def generated(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs
    )


@torch.no_grad()
def delta_error(model, pairs: dict[str, float], name: str) -> float:
    """Largest gap, over this rank's shards of every adapted layer, between the combined adapter's
    delta and the weighted sum of its sources'."""
    gaps = []
    for _, layer in bdlora_layers(model):
        if name in layer.lora_A:
            expected = sum(w * layer.delta_weight(n) for n, w in pairs.items())
            gaps.append(float((layer.delta_weight(name) - expected).abs().max()))
    return max(gaps)


def mixed_cases(mesh, group) -> dict:
    ids = batch()
    model = build("abcd", mesh)
    mixed, mixed_comm = counted(model, group, input_ids=ids, adapter_names=NAMES)
    bdlora.set_adapter(model, "a")
    _, single_comm = counted(model, group, input_ids=ids)
    alone = {n: build(n, mesh) for n in ("a", "b", "c", "")}
    out = {"mixed": mixed, "mixed_comm": mixed_comm, "single_comm": single_comm}
    out["alone"] = {n: logits(m, ids) for n, m in alone.items()}
    out["generated"] = generated(model, ids, adapter_names=NAMES)
    out["generated_alone"] = {n: generated(m, ids) for n, m in alone.items()}
    beams = dict(num_beams=2, num_return_sequences=2)  # generate repeats each row: so must the names
    out["beams"] = generated(model, ids[:3], adapter_names=NAMES[:3], **beams)
    out["beams_alone"] = {n: generated(m, ids[:3], **beams) for n, m in alone.items()}
    out["unknown"] = error(model, input_ids=ids, adapter_names=["a", "zz", "a", "a", "a"])
    return out


def combine_cases(mesh, out_dir: Path, tp: int) -> dict:
    ids = batch()
    model = build("abcd", mesh)
    combine_adapters(model, WEIGHTS, "ab")
    out = {"delta_error": delta_error(model, WEIGHTS, "ab")}
    out["factors"] = {n: layer.full_factors("ab") for n, layer in bdlora_layers(model)}
    bdlora.set_adapter(model, "ab")
    out["combined"] = logits(model, ids)
    out["mixed_combined"] = model(
        input_ids=ids, adapter_names=["ab", "a", "b", "__base__", "ab"]
    ).logits.detach()
    bdlora.save_adapter(model, out_dir / f"ab-tp{tp}", adapter_name="ab")
    out["mismatched"] = error(combine_adapters, model, {"a": 0.5, "d": 0.5}, "ad")
    return out


def moe_cases(mesh, group) -> dict:
    ids = batch(len(MOE_NAMES), vocab=TINY["vocab_size"])
    model = build_moe("efg", mesh)
    mixed, mixed_comm = counted(model, group, input_ids=ids, adapter_names=MOE_NAMES)
    bdlora.set_adapter(model, "e")
    _, single_comm = counted(model, group, input_ids=ids)
    combine_adapters(model, {"e": 0.7, "f": -0.4}, "ef")
    out = {"mixed": mixed, "mixed_comm": mixed_comm, "single_comm": single_comm}
    out["alone"] = {n: logits(build_moe(n, mesh), ids) for n in ("e", "f", "g", "")}
    out["delta_error"] = delta_error(model, {"e": 0.7, "f": -0.4}, "ef")
    return out


DENSE = {n: {**ADAPTERS[n], "nblocks": 1} for n in "abc"}  # the dense-LoRA shardings


def dense_cases(mesh) -> dict:
    """``replicated`` mixes rows and combines on each rank's shards; ``slora`` refuses both."""
    ids = batch()
    model = add_adapters(build("", mesh, sharding="replicated"), "abc", DENSE)
    with torch.no_grad():
        out = {"mixed": model(input_ids=ids, adapter_names=NAMES).logits}
    out["alone"] = {
        n: logits(add_adapters(build("", mesh, sharding="replicated"), n, DENSE), ids) for n in "abc"
    }
    out["alone"][""] = logits(build("", mesh, sharding="replicated"), ids)
    combine_adapters(model, WEIGHTS, "ab")
    out["delta_error"] = delta_error(model, WEIGHTS, "ab")
    slora = add_adapters(build("", mesh, sharding="slora"), "ab", DENSE)
    out["slora_mixed"] = error(slora, input_ids=batch(2), adapter_names=["a", "b"])
    out["slora_combine"] = error(combine_adapters, slora, WEIGHTS, "ab")
    return out


def walk(tp: int, out_dir: str) -> dict:
    """Every case at TP ``tp`` (every rank runs it); a case that fails returns its traceback."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=tp)) if tp > 1 else None
    group = None if mesh is None else mesh.get_group("tp")
    cases = {
        "mixed": lambda: mixed_cases(mesh, group),
        "combine": lambda: combine_cases(mesh, Path(out_dir), tp),
        "moe": lambda: moe_cases(mesh, group),
        "dense": lambda: dense_cases(mesh) if tp > 1 else {},
    }
    out = {}
    for name, case in cases.items():
        try:
            out[name] = case()
        except Exception:  # noqa: BLE001  (reported by the test that reads it)
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi_adapter")


@pytest.fixture(scope="module")
def walks(out_dir) -> dict:
    """TP degree -> each rank's ``walk``, launched on first use (TP 2: one launch of two ranks)."""
    cache: dict[int, list[dict]] = {}

    def get(tp: int) -> list[dict]:
        if tp not in cache:
            cache[tp] = [walk(1, str(out_dir))] if tp == 1 else run_distributed(walk, tp, tp, str(out_dir))
        return cache[tp]

    return get


def case(walks, tp: int, name: str) -> list[dict]:
    ranks = walks(tp)
    for rank, result in enumerate(ranks):
        if isinstance(result[name], str):
            pytest.fail(f"TP {tp} rank {rank}, case {name!r}:\n{result[name]}", pytrace=False)
    return [result[name] for result in ranks]


TPS = [1, pytest.param(2, marks=pytest.mark.slow)]


# --- mixed batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", TPS)
def test_each_row_of_a_mixed_batch_is_that_adapter_alone(walks, tp):
    for res in case(walks, tp, "mixed"):
        for row, name in enumerate(NAMES):
            alone = res["alone"]["" if name == "__base__" else name]
            torch.testing.assert_close(res["mixed"][row], alone[row], **TOL, msg=f"row {row} ({name})")
        assert "non-existing adapter(s): zz. Loaded adapters: a, b, c, d" in res["unknown"]
        base = res["alone"][""]
        assert min((res["alone"][n] - base).abs().max() for n in "abc") > 1e-2  # each adapter matters
    if tp > 1:  # and the same logits as one process
        torch.testing.assert_close(res["mixed"], case(walks, 1, "mixed")[0]["mixed"], **TOL)


@pytest.mark.parametrize("tp", TPS)
def test_a_mixed_batch_issues_the_collectives_of_a_single_adapter_forward(walks, tp):
    for res in case(walks, tp, "mixed") + case(walks, tp, "moe"):
        assert res["mixed_comm"] == res["single_comm"]
        if tp > 1:  # the counter sees the base's all-reduces: it is looking
            assert res["single_comm"]["ops"].get("all_reduce", 0) > 0


@pytest.mark.parametrize("tp", TPS)
def test_generate_with_adapter_names_equals_each_adapter_alone(walks, tp):
    for res in case(walks, tp, "mixed"):
        for row, name in enumerate(NAMES):
            alone = res["generated_alone"]["" if name == "__base__" else name]
            assert torch.equal(res["generated"][row], alone[row]), f"row {row} ({name})"
        for row, name in enumerate(NAMES[:3]):  # beams: each prompt's two sequences
            alone = res["beams_alone"]["" if name == "__base__" else name]
            assert torch.equal(res["beams"][2 * row : 2 * row + 2], alone[2 * row : 2 * row + 2]), name


@pytest.mark.parametrize("tp", TPS)
def test_moe_mixed_batch_rows_are_each_adapter_alone(walks, tp):
    """Experts per token of each row; at TP 1 also the router, run per adapter and put back in order."""
    for res in case(walks, tp, "moe"):
        for row, name in enumerate(MOE_NAMES):
            alone = res["alone"]["" if name == "__base__" else name]
            torch.testing.assert_close(res["mixed"][row], alone[row], **TOL, msg=f"row {row} ({name})")


@pytest.mark.slow
def test_dense_shardings_replicated_mixes_and_combines_slora_refuses(walks):
    for res in case(walks, 2, "dense"):
        for row, name in enumerate(NAMES):
            alone = res["alone"]["" if name == "__base__" else name]
            torch.testing.assert_close(res["mixed"][row], alone[row], **TOL, msg=f"row {row} ({name})")
        assert res["delta_error"] < 1e-6
        assert res["slora_mixed"].startswith(
            "BDLoraConfigError: a mixed batch (adapter_names) is not supported"
        )
        assert "sharded 'slora'" in res["slora_mixed"] and "sharding='bdlora'" in res["slora_mixed"]
        assert res["slora_combine"].startswith("BDLoraConfigError: combine_adapters is not supported")


# --- combined adapters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def combined_reference() -> torch.Tensor:
    """W + 0.7 dW_a + 0.3 dW_b in float64, unsharded: the logits the combined adapter must give."""
    model = build("ab").double()
    with torch.no_grad():
        for _, layer in bdlora_layers(model):
            for name, weight in WEIGHTS.items():
                a, b = (f.double() for f in layer.full_factors(name))
                a, b = dense_factors(layer.role, a, b, layer.local_nblocks[name])
                layer.weight.add_(weight * layer.scaling[name] * (b @ a))
    with bdlora.disable_adapters(model):
        return logits(model, batch()).float()


@pytest.fixture(scope="module")
def peft_cat(out_dir) -> torch.Tensor:
    """PEFT's own rank concatenation of the two adapters, saved as plain LoRA."""
    from peft import PeftModel

    model = build("ab")
    for name in WEIGHTS:
        bdlora.save_adapter(model, out_dir / f"peft-{name}", format="peft-lora", adapter_name=name)
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama"), out_dir / "peft-a", adapter_name="a")
    peft_model.load_adapter(out_dir / "peft-b", adapter_name="b")
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type="cat")
    peft_model.set_adapter("ab")
    return logits(peft_model.eval(), batch())


@pytest.mark.parametrize("tp", TPS)
def test_combined_adapter_is_the_weighted_sum_of_deltas(walks, tp, combined_reference, peft_cat):
    for res in case(walks, tp, "combine"):
        assert res["delta_error"] < 1e-6  # on each rank's own shards
        torch.testing.assert_close(res["combined"], combined_reference, **TOL)
        torch.testing.assert_close(res["combined"], peft_cat, **TOL)
        mixed = res["mixed_combined"]  # rows: ab, a, b, __base__, ab: it mixes like any other adapter
        torch.testing.assert_close(mixed[[0, 4]], res["combined"][[0, 4]], **TOL)
        assert (mixed[1:4] - res["combined"][1:4]).abs().amax(dim=(1, 2)).min() > 1e-2
        assert "nblocks=2" in res["mismatched"] and "nblocks=4" in res["mismatched"]
    for res in case(walks, tp, "moe"):  # expert tensors and routers (TP 1) too
        assert res["delta_error"] < 1e-6


@pytest.mark.slow
def test_combining_sharded_in_place_gives_the_unsharded_combination(walks):
    """Each rank's concatenation of its own shards is its shard of the TP 1 combination, bit for bit."""
    reference = case(walks, 1, "combine")[0]["factors"]
    for res in case(walks, 2, "combine"):
        assert res["factors"].keys() == reference.keys()
        for name, (a, b) in reference.items():
            assert torch.equal(res["factors"][name][0], a) and torch.equal(res["factors"][name][1], b), name


@pytest.mark.parametrize("tp", TPS)
def test_peft_loads_the_saved_combined_adapter(walks, tp, out_dir):
    from peft import PeftModel

    res = case(walks, tp, "combine")[0]
    directory = out_dir / f"ab-tp{tp}"
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert saved["use_bdlora"]["nblocks"] == 2
    # summed ranks, alpha = rank: q 4+4, down 8+6, the rest 8+4
    assert (saved["r"], saved["lora_alpha"]) == (12, 12)
    assert saved["rank_pattern"] == {"q_proj": 8, "down_proj": 14}
    assert saved["alpha_pattern"] == {"q_proj": 8, "down_proj": 14}
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama"), directory).eval()
    torch.testing.assert_close(logits(peft_model, batch()), res["combined"], **TOL)


# --- bad input, named -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def abcd():
    return build("abcd")


def test_bad_adapter_names_are_refused_before_any_compute(abcd):
    ids = batch()
    calls = []
    hook = abcd.get_input_embeddings().register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(
            ValueError, match=r"non-existing adapter\(s\): x, zz\. Loaded adapters: a, b, c, d"
        ):
            abcd(input_ids=ids, adapter_names=["a", "zz", "x", "a", "a"])
        with pytest.raises(ValueError, match=r"non-existing adapter\(s\): zz"):
            abcd.generate(ids, adapter_names=["zz"] * 5, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"should be the same as the number of inputs, but got 2 and 5"):
            abcd(input_ids=ids, adapter_names=["a", "b"])
        with pytest.raises(ValueError, match=r"but got 4 and 5"):
            abcd.generate(ids, adapter_names=["a"] * 4, max_new_tokens=2)
        with pytest.raises(TypeError, match="expected a list of str"):
            abcd(input_ids=ids, adapter_names="a")
        abcd.train()
        with pytest.raises(ValueError, match="training mode"):
            abcd(input_ids=ids, adapter_names=NAMES)
    finally:
        abcd.eval()
        hook.remove()
    assert calls == []


def test_a_merged_adapter_refuses_mixed_batches_until_unmerged():
    model = build("ab")
    bdlora.merge_adapter(model, "a")
    with pytest.raises(ValueError, match=r"merged adapters, please call `bdlora.unmerge_adapter\(model\)`"):
        model(input_ids=batch(2), adapter_names=["a", "b"])
    bdlora.unmerge_adapter(model)
    model(input_ids=batch(2), adapter_names=["a", "b"])


def test_combining_mismatched_adapters_names_the_difference(abcd):
    before = list(adapters_of(abcd))
    with pytest.raises(BDLoraConfigError, match=r"'a' \(nblocks=2\) and 'd' \(nblocks=4\)"):
        combine_adapters(abcd, {"a": 0.5, "d": 0.5}, "ad")
    with pytest.raises(
        BDLoraConfigError,
        match=r"module 'model\.layers\.0\.self_attn\.k_proj' is adapted by 'a' but not by 'c'",
    ):
        combine_adapters(abcd, {"a": 0.5, "c": 0.5}, "ac")
    with pytest.raises(KeyError, match=r"no adapter 'zz' to combine; have: a, b, c, d"):
        combine_adapters(abcd, {"a": 0.5, "zz": 0.5}, "az")
    with pytest.raises(ValueError, match=r"adapter 'b' already exists"):
        combine_adapters(abcd, WEIGHTS, "b")
    with pytest.raises(ValueError, match=r"weights\['b'\] = nan"):
        combine_adapters(abcd, {"a": 1.0, "b": float("nan")}, "ab")
    assert list(adapters_of(abcd)) == before


def test_a_combined_adapter_reloads_from_a_sharded_checkpoint(tmp_path):
    """Its config re-resolves to its plan: the trainer's checkpoints hold it like any adapter."""
    from bdlora.parallel.checkpoint import load_sharded_adapter, save_sharded_adapter

    model = combine_adapters(build("ab"), WEIGHTS, "ab")
    save_sharded_adapter(model, tmp_path, adapter_name="ab")
    fresh = tiny_model("tiny-llama")
    load_sharded_adapter(fresh, tmp_path, adapter_name="ab")
    assert adapters_of(fresh)["ab"].plan.to_dict() == adapters_of(model)["ab"].plan.to_dict()
    bdlora.set_adapter(model, "ab")
    torch.testing.assert_close(logits(fresh.eval(), batch()), logits(model, batch()), **TOL)


# --- bdlora generate with several adapters --------------------------------------------------------


def test_cli_generates_each_prompt_with_its_own_adapter_in_one_batch(tmp_path, capsys):
    from tests.test_export import write_run

    preset = ModelConfig(source="preset", name="tiny-llama", seed=0)
    runs = {}
    for name in ("a", "b"):
        runs[name] = write_run(tmp_path / name, _single(name), preset).run_dir
    prompts = ["copy abc", "hello there"]
    argv = ["generate", str(runs["a"]), "--max-new-tokens", "6", "--adapter", f"other={runs['b']}"]
    argv += [arg for p in prompts for arg in ("--prompt", p)]
    assert main([*argv, "--adapter-names", "other,default"]) == 0
    out = capsys.readouterr().out
    expected = []
    for run, prompt in ((runs["b"], prompts[0]), (runs["a"], prompts[1])):
        assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
        expected.append(capsys.readouterr().out.rstrip("\n"))
    blocks = out.split("--- prompt ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["1/2, adapter other", "2/2, adapter default"]
    assert [b.split("\n", 1)[1].rstrip("\n") for b in blocks] == expected
    assert main([*argv, "--adapter-names", "default,nope"]) == 2
    assert "--adapter-names: no adapter 'nope'; loaded: default, other" in capsys.readouterr().err


def _single(name: str):
    """tiny-llama with adapter ``name`` alone, saved under the trainer's name ``default``."""
    model = tiny_model("tiny-llama")
    seed = list(ADAPTERS).index(name)
    torch.manual_seed(seed)
    apply_bdlora(model, BDLoraConfig(**ADAPTERS[name]))
    randomize(model, "default", 100 + seed)
    return model.eval()
