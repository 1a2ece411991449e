"""TP plans beyond Llama's at TP 2: packed projections, whole-output styles, and user-given plans.

GLM-4 runs its own plan (``gate_up_proj`` colwise_gather_output, ``down_proj`` rowwise_split_input)
and a user plan that shards the packed ``gate_up_proj`` segment by segment (``packed_colwise``,
``down_proj`` rowwise): each rank then holds its slice of gate and of up, and BD-LoRA's B blocks
follow the segments. Phi-3 packs q, k, v and gate, up, all gathered. S-LoRA runs the packed and
the gathered layouts too. In every layout the loss,
logits and adapter gradients equal the single-process reference, PEFT loads the adapter saved from
the sharded model with the reference's logits, and the BD-LoRA adapter adds no collective.

OPT has no plan: the error proposes one from its layers' names, and since OPT's decoder layer holds
its MLP's layers beside the residual, that plan's first forward refuses it instead of summing the
residual over the ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
import tests.architectures as archs
from bdlora import BDLoraConfigError
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.placement import TPPlacementError
from bdlora.parallel.sharding import suggest_tp_plan
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

GLM_PACKED_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_up_proj": "packed_colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
# case -> (architecture, user TP plan or None for the config's own, adapter sharding)
CASES = {
    "glm4": ("glm4", None, "bdlora"),
    "glm4-packed": ("glm4", GLM_PACKED_PLAN, "bdlora"),
    "phi3": ("phi3", None, "bdlora"),
    "glm4-packed-slora": ("glm4", GLM_PACKED_PLAN, "slora"),
    "phi3-slora": ("phi3", None, "slora"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
OPT = dict(
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=256,
    word_embed_proj_dim=64,
)
# nblocks 4: a packed layer of 2 segments at TP 2 needs a multiple of 4
ADAPTER = bdlora.BDLoraConfig(rank=8, alpha=16, nblocks=4, target_modules=TARGETS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packed")
    dirs = {}
    opt = AutoConfig.for_model("opt", **OPT)
    for arch, config in (
        ("glm4", archs.tiny_config("glm4")),
        ("phi3", archs.tiny_config("phi3")),
        ("opt", opt),
    ):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


def step(model_dir: str, tp_plan, sharding: str, adapter: bool, mesh=None) -> dict:
    """One train step of a seeded adapter (or none), with the TP collectives it issued."""
    config = ADAPTER if adapter else None
    model = bdlora.from_pretrained(
        model_dir, config, mesh=mesh, tp_plan=tp_plan, sharding=sharding, seed=archs.ADAPTER_SEED
    )
    if adapter:
        archs.randomize_adapter(model)
    model.get_input_embeddings().weight.requires_grad_(True)  # the same backward with and without
    ids = archs.batch()
    with CommCounter({"tp": None if mesh is None else mesh.get_group("tp")}) as comm:
        out = model.train()(input_ids=ids, labels=ids)
        out.loss.backward()
    return {
        "loss": out.loss.item(),
        "logits": out.logits.detach(),
        "grads": archs.gathered_grads(model),
        "comm": comm.summary().get("tp", {"count": 0, "ops": {}}),
    }


def sharded(model_dirs: dict[str, str], adapter_root: str) -> dict[str, dict]:
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=2))
    out = {}
    for case, (arch, tp_plan, sharding) in CASES.items():
        out[case] = step(model_dirs[arch], tp_plan, sharding, adapter=True, mesh=mesh)
        out[case]["base_comm"] = step(model_dirs[arch], tp_plan, sharding, adapter=False, mesh=mesh)["comm"]
        model = bdlora.from_pretrained(
            model_dirs[arch], ADAPTER, mesh=mesh, tp_plan=tp_plan, sharding=sharding
        )
        archs.randomize_adapter(model)
        bdlora.save_adapter(model, f"{adapter_root}/{case}")
    out["opt"] = capture_opt(model_dirs["opt"], mesh)
    return out


def capture_opt(model_dir: str, mesh) -> dict[str, str]:
    """The errors OPT meets: no plan, then the plan the first error proposes."""
    out = {}
    try:
        bdlora.from_pretrained(model_dir, mesh=mesh)
    except BDLoraConfigError as err:
        out["no_plan"] = str(err)
    model = bdlora.from_pretrained(model_dir, mesh=mesh, tp_plan=suggest_tp_plan(_meta_model(model_dir)))
    try:
        model(input_ids=archs.batch())
    except TPPlacementError as err:
        out["forward"] = str(err)
    return out


def _meta_model(model_dir: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def tp2(model_dirs, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("packed_adapters")
    return {"root": str(root), "ranks": run_distributed(sharded, 2, model_dirs, str(root))}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_matches_one_process(model_dirs, tp2, case):
    arch, _, sharding = CASES[case]
    ref = step(model_dirs[arch], None, sharding, adapter=True)
    for rank, res in enumerate(tp2["ranks"]):
        torch.testing.assert_close(res[case]["loss"], ref["loss"], **archs.TOL, msg=f"rank {rank} loss")
        torch.testing.assert_close(res[case]["logits"], ref["logits"], **archs.TOL)
        assert res[case]["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(res[case]["grads"][name], grad, **archs.TOL, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_adapter_saved_at_tp2(model_dirs, tp2, case):
    arch, _, sharding = CASES[case]
    reference = bdlora.from_pretrained(model_dirs[arch], ADAPTER, sharding=sharding, seed=archs.ADAPTER_SEED)
    archs.randomize_adapter(reference)
    expected = archs.eval_logits(reference, archs.batch())
    got = archs.peft_logits(model_dirs[arch], f"{tp2['root']}/{case}")
    torch.testing.assert_close(got, expected, **archs.TOL)


def test_adapters_add_no_collective_and_packing_drops_the_gathers(tp2):
    layers = 2
    for res in tp2["ranks"]:
        for case, (_, _, sharding) in CASES.items():
            if sharding == "bdlora":
                assert res[case]["comm"] == res[case]["base_comm"], case
            else:  # S-LoRA's (tokens, r) collectives, on top of the same base ones
                assert res[case]["comm"]["count"] > res[case]["base_comm"]["count"], case
        gathered, packed = res["glm4"]["comm"]["ops"], res["glm4-packed"]["comm"]["ops"]
        # per layer: the MLP's output all-gather and its input split's backward all-gather go away
        assert gathered["all_gather"] - packed.get("all_gather", 0) == 2 * layers
        assert gathered["all_reduce"] == packed["all_reduce"]  # f and g of every block, as before


def test_a_model_without_plan_gets_one_proposed_and_a_block_with_a_residual_is_refused(tp2):
    for res in tp2["ranks"]:
        no_plan, forward = res["opt"]["no_plan"], res["opt"]["forward"]
        assert "OPTForCausalLM has no TP plan" in no_plan
        for key, style in {
            "decoder.layers.*.self_attn.q_proj": "colwise",
            "decoder.layers.*.self_attn.out_proj": "rowwise",
            "decoder.layers.*.fc1": "colwise",
            "decoder.layers.*.fc2": "rowwise",
        }.items():
            assert f'"{key}": "{style}"' in no_plan
        assert "module 'model.decoder.layers.0' returns more than its row-parallel layer" in forward
        assert "'model.decoder.layers.0.fc2'" in forward
