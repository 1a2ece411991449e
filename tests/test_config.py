"""Tier 1: pattern configs, validation errors, plans and parameter counts; no process group."""

from __future__ import annotations

import pytest
import torch
from peft import BdLoraConfig, LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bdlora import BDLoraConfig, BDLoraConfigError, Role, apply_bdlora, resolve_plan
from bdlora.cli import main
from tests.conftest import COLUMN_LEAVES, linear_names, peft_layout, tiny_model

NAME = "model.layers.3.mlp.down_proj"
BD_LISTS = dict(
    target_modules_bd_a=["o_proj", "down_proj"],
    target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
)


def key_for(name: str, patterns: dict) -> str | None:
    return BDLoraConfig(patterns=patterns).match(name)[0]


def expected_params(role: Role, d_in: int, d_out: int, rank: int, nblocks: int) -> int:
    """BDLORA.md: column r (d_in + d_out/N), row r (d_in/N + d_out)."""
    if role is Role.COLUMN:
        return rank * (d_in + d_out // nblocks)
    return rank * (d_in // nblocks + d_out)


# -- pattern semantics -------------------------------------------------------------------------


def test_first_match_wins_and_order_matters():
    layer0_first = {r"layers\.0\..*": {"rank": 4}, "q_proj": {"rank": 6}}
    q_first = dict(reversed(list(layer0_first.items())))
    name = "model.layers.0.self_attn.q_proj"
    key, settings = BDLoraConfig(patterns=layer0_first).match(name)
    assert (key, settings.rank, settings.pattern) == (r"layers\.0\..*", 4, r"layers\.0\..*")
    key, settings = BDLoraConfig(patterns=q_first).match(name)
    assert (key, settings.rank) == ("q_proj", 6)


def test_unmatched_module_gets_global_defaults():
    config = BDLoraConfig(rank=8, alpha=32, patterns={"q_proj": {"rank": 4}})
    key, settings = config.match("model.layers.0.self_attn.k_proj")
    assert key is None
    assert (settings.rank, settings.alpha, settings.scale, settings.pattern) == (8, 32, 4.0, None)


def test_none_excludes_module_from_plan(tiny_llama):
    config = BDLoraConfig(patterns={r"layers\.1\.mlp\.down_proj": None})
    assert config.match("model.layers.1.mlp.down_proj") == (r"layers\.1\.mlp\.down_proj", None)
    plan = resolve_plan(tiny_llama, config)
    assert "model.layers.1.mlp.down_proj" not in plan.names
    assert "model.layers.0.mlp.down_proj" in plan.names
    assert [name for name, _ in plan.excluded] == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize(
    "key", ["down_proj", r"mlp\.down_proj", r"layers\.3\..*", r".*_proj", NAME.replace(".", r"\.")]
)
def test_suffix_rule_matches(key):
    assert key_for(NAME, {key: {"rank": 4}}) == key


@pytest.mark.parametrize("key", ["layers", "mlp", "down", "proj", "own_proj", r"layers\.3", r"layers\.4\..*"])
def test_key_matching_only_a_middle_or_partial_part_does_not_match(key):
    assert key_for(NAME, {key: {"rank": 4}}) is None


def test_anchored_key_matches_only_the_full_name():
    assert key_for(NAME, {r"\Amodel\.layers\.3\.mlp\.down_proj": {"rank": 4}}) is not None
    assert key_for(NAME, {r"\Amodel\.layers\.3\..*": {"rank": 4}}) is not None
    assert key_for(NAME, {r"\Amlp\.down_proj": {"rank": 4}}) is None
    assert key_for(NAME, {r"\Alayers\.3\..*": {"rank": 4}}) is None
    assert key_for(NAME, {r"\Adown_proj": {"rank": 4}}) is None


def test_target_modules_use_the_same_suffix_rule():
    config = BDLoraConfig(target_modules=[r"self_attn\.(q|v)_proj"])
    assert config.is_target("model.layers.0.self_attn.q_proj")
    assert config.is_target("model.layers.0.self_attn.v_proj")
    assert not config.is_target("model.layers.0.self_attn.k_proj")
    assert not config.is_target("model.layers.0.self_attn")


# -- validation errors -------------------------------------------------------------------------


def test_bad_regex_names_the_key():
    with pytest.raises(BDLoraConfigError, match=r"patterns\['q_proj\('\].*not a valid regular expression"):
        BDLoraConfig(patterns={"q_proj(": {"rank": 4}})
    with pytest.raises(BDLoraConfigError, match=r"target_modules entry '\[q'.*not a valid regular"):
        BDLoraConfig(target_modules=["[q"])


def test_unknown_override_key_names_key_pattern_and_closest():
    with pytest.raises(BDLoraConfigError) as err:
        BDLoraConfig(patterns={"q_proj": {"rnak": 4}})
    message = str(err.value)
    assert "patterns['q_proj']" in message
    assert "'rnak'" in message
    assert "did you mean 'rank'" in message
    with pytest.raises(BDLoraConfigError, match="did you mean 'alpha'"):
        BDLoraConfig(patterns={"v_proj": {"alhpa": 4}})


def test_overrides_must_be_a_dict_or_none():
    with pytest.raises(BDLoraConfigError, match=r"patterns\['q_proj'\]: expected a dict of overrides"):
        BDLoraConfig(patterns={"q_proj": 4})


def test_unknown_role_override_is_a_config_error():
    with pytest.raises(BDLoraConfigError, match=r"patterns\['q_proj'\]: unknown role 'diagonal'"):
        BDLoraConfig(patterns={"q_proj": {"role": "diagonal"}})


def test_rank_not_divisible_by_nblocks():
    with pytest.raises(BDLoraConfigError, match=r"global settings: rank 6 is not divisible by nblocks=4"):
        BDLoraConfig(rank=6, nblocks=4)
    with pytest.raises(
        BDLoraConfigError, match=r"patterns\['q_proj'\]: rank 5 is not divisible by nblocks=2"
    ):
        BDLoraConfig(patterns={"q_proj": {"rank": 5}})


@pytest.mark.parametrize(
    ("target", "module", "dim"),
    [
        ("q_proj", "model.layers.0.self_attn.q_proj", "d_out=64"),
        ("o_proj", "model.layers.0.self_attn.o_proj", "d_in=64"),
    ],
)
def test_split_dimension_not_divisible_by_nblocks(tiny_llama, target, module, dim):
    config = BDLoraConfig(rank=6, nblocks=3, target_modules=[target])
    with pytest.raises(BDLoraConfigError) as err:
        resolve_plan(tiny_llama, config)
    message = str(err.value)
    assert repr(module) in message
    assert f"{dim} is not divisible by nblocks=3" in message


def test_unmatched_pattern_errors_by_default(tiny_llama):
    config = BDLoraConfig(patterns={"q_proj": {"rank": 4}, "qproj": {"rank": 2}})
    with pytest.raises(BDLoraConfigError, match=r"'qproj' match no targeted module"):
        resolve_plan(tiny_llama, config)


def test_pattern_on_untargeted_module_counts_as_unmatched(tiny_llama):
    config = BDLoraConfig(target_modules=["q_proj"], patterns={"v_proj": None})
    with pytest.raises(BDLoraConfigError, match="'v_proj' match no targeted module"):
        resolve_plan(tiny_llama, config)


def test_unmatched_pattern_warns_and_plan_builds(tiny_llama):
    config = BDLoraConfig(patterns={"qproj": {"rank": 2}}, on_unmatched_pattern="warn")
    with pytest.warns(UserWarning, match="'qproj' match no targeted module"):
        plan = resolve_plan(tiny_llama, config)
    assert len(plan.modules) == len(linear_names(tiny_llama))
    assert any("qproj" in note for note in plan.notes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), r"global settings: rank must be a positive integer, got 0"),
        (dict(rank=-2), r"rank must be a positive integer, got -2"),
        (dict(alpha=0), r"alpha must be a positive number, got 0"),
        (dict(alpha=-1.0), r"alpha must be a positive number, got -1.0"),
        (dict(patterns={"q_proj": {"rank": 0}}), r"patterns\['q_proj'\]: rank must be a positive integer"),
        (dict(patterns={"q_proj": {"alpha": -4}}), r"patterns\['q_proj'\]: alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must lie in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout must lie in \[0, 1\), got -0.1"),
        (dict(patterns={"q_proj": {"dropout": 1.5}}), r"patterns\['q_proj'\]: dropout must lie in"),
        (dict(init="xavier"), r"unknown init 'xavier'; valid: lora, gaussian, base_stats"),
        (dict(patterns={"q_proj": {"init": "zeros"}}), r"patterns\['q_proj'\]: unknown init 'zeros'"),
        (dict(nblocks=0), r"nblocks must be a positive integer, got 0"),
        (dict(on_unmatched_pattern="raise"), r"on_unmatched_pattern must be one of error, warn, ignore"),
        (dict(target_modules=[]), r"target_modules and target_parameters are empty"),
    ],
)
def test_setting_errors(kwargs, message):
    with pytest.raises(BDLoraConfigError, match=message):
        BDLoraConfig(**kwargs)


def test_unknown_top_level_key_suggests_closest():
    with pytest.raises(BDLoraConfigError, match=r"unknown config key 'rnak'; did you mean 'rank'"):
        BDLoraConfig.from_dict({"rnak": 8})
    with pytest.raises(BDLoraConfigError, match=r"unknown config key 'nblock'; did you mean 'nblocks'"):
        BDLoraConfig.from_yaml("nblock: 2\n")


def test_non_mapping_yaml_is_an_error():
    with pytest.raises(BDLoraConfigError, match="expected a YAML mapping"):
        BDLoraConfig.from_yaml("- rank\n- alpha\n")


def test_no_module_left_is_an_error(tiny_llama):
    config = BDLoraConfig(target_modules=["q_proj"], patterns={"q_proj": None})
    with pytest.raises(BDLoraConfigError, match="no module left to adapt"):
        resolve_plan(tiny_llama, config)


def test_target_matching_a_non_linear_leaf_is_an_error(tiny_llama):
    with pytest.raises(
        BDLoraConfigError,
        match=r"'model.layers.0.input_layernorm'.*nn.Linear and transformers Conv1D modules only",
    ):
        resolve_plan(tiny_llama, BDLoraConfig(target_modules=["input_layernorm"]))


# -- serialisation -----------------------------------------------------------------------------

ORDERED = BDLoraConfig(
    rank=8,
    alpha=16,
    nblocks=2,
    init="base_stats",
    patterns={
        r"layers\.1\.mlp\.down_proj": None,
        r"layers\.0\..*": {"rank": 4, "alpha": 8.0, "init": "gaussian"},
        "q_proj": {"rank": 6, "dropout": 0.1},
        "gate_proj": {"role": "row", "alpha": 4.0},
        ".*_proj": {"alpha": 32.0},
    },
)


def test_order_of_this_config_matters(tiny_llama):
    reordered = BDLoraConfig(**{**ORDERED.to_dict(), "patterns": dict(reversed(ORDERED.patterns.items()))})
    assert resolve_plan(tiny_llama, reordered) != resolve_plan(tiny_llama, ORDERED)


def test_dict_round_trip_keeps_order_and_plan(tiny_llama):
    again = BDLoraConfig.from_dict(ORDERED.to_dict())
    assert list(again.patterns) == list(ORDERED.patterns)
    assert again.to_dict() == ORDERED.to_dict()
    assert resolve_plan(tiny_llama, again) == resolve_plan(tiny_llama, ORDERED)


def test_yaml_round_trip_string_and_file(tiny_llama, tmp_path):
    path = tmp_path / "bdlora.yaml"
    text = ORDERED.to_yaml(path)
    assert path.read_text() == text
    reference = resolve_plan(tiny_llama, ORDERED)
    for source in (text, path, str(path)):
        again = BDLoraConfig.from_yaml(source)
        assert list(again.patterns) == list(ORDERED.patterns)
        assert resolve_plan(tiny_llama, again) == reference


def test_role_override_round_trips_as_a_role(tiny_llama):
    again = BDLoraConfig.from_yaml(ORDERED.to_yaml())
    assert again.to_dict()["patterns"]["gate_proj"] == {"role": "row", "alpha": 4.0}
    assert resolve_plan(tiny_llama, again)["model.layers.1.mlp.gate_proj"].role is Role.ROW


# -- PEFT LoraConfig conversion ----------------------------------------------------------------


def bdlora_layout(model: nn.Module, lora_config: LoraConfig) -> dict[str, tuple | None]:
    plan = resolve_plan(model, BDLoraConfig.from_peft(lora_config))
    return {
        m.name: (m.rank, float(m.settings.alpha), m.role if plan.global_nblocks > 1 else None)
        for m in plan.modules
    }


def with_unadapted(model: nn.Module, layout: dict) -> dict:
    return {name: layout.get(name) for name in linear_names(model)}


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CASES = {
    "target_list": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "target_regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|o_proj|up_proj)"),
    "exclude_list": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL,
        exclude_modules=["model.layers.0.self_attn.q_proj", "down_proj"],
    ),
    "exclude_regex": dict(
        r=4, lora_alpha=8, target_modules=ALL, exclude_modules=r".*layers\.1\.self_attn\..*"
    ),
    "rank_alpha_overlap": dict(
        r=8,
        lora_alpha=16,
        target_modules=ALL,
        rank_pattern={r"layers\.1\..*": 2, "q_proj": 4, "v_proj": 6},
        alpha_pattern={"q_proj": 32, "gate_proj": 3, r"layers\.0\.mlp\..*": 5},
    ),
    "bdlora_roles": dict(
        r=8,
        lora_alpha=16,
        target_modules=ALL,
        use_bdlora=BdLoraConfig(**BD_LISTS, nblocks=2),
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*": 2},
        alpha_pattern={"o_proj": 4, "q_proj": 12},
        exclude_modules=["model.layers.1.self_attn.k_proj"],
    ),
    "bdlora_nblocks4_regex": dict(
        r=8,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|k_proj|o_proj|down_proj)",
        use_bdlora=BdLoraConfig(
            target_modules_bd_a=["o_proj", "down"], target_modules_bd_b=["q_", "k_"], nblocks=4
        ),
        rank_pattern={r"layers\.0\.self_attn\..*": 4},
    ),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_from_peft_builds_what_peft_builds(case):
    lora_config = LoraConfig(**PEFT_CASES[case])
    model = tiny_model()
    ours = with_unadapted(model, bdlora_layout(model, lora_config))
    theirs = with_unadapted(model, peft_layout(get_peft_model(tiny_model(), lora_config)))
    assert any(theirs.values())
    assert ours == theirs


def test_from_peft_accepts_a_saved_config_dict():
    lora_config = LoraConfig(**PEFT_CASES["bdlora_roles"])
    model = tiny_model()
    from_dict = resolve_plan(model, BDLoraConfig.from_peft(lora_config.to_dict()))
    assert from_dict == resolve_plan(model, BDLoraConfig.from_peft(lora_config))


def test_from_peft_rejects_options_it_cannot_reproduce():
    with pytest.raises(BDLoraConfigError, match="use_rslora"):
        BDLoraConfig.from_peft(LoraConfig(target_modules=["q_proj"], use_rslora=True))
    with pytest.raises(BDLoraConfigError, match="layers_to_transform"):
        BDLoraConfig.from_peft(LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]))
    with pytest.raises(BDLoraConfigError, match="use_dora"):
        BDLoraConfig.from_peft(LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(BDLoraConfigError, match="lora_bias"):
        BDLoraConfig.from_peft(LoraConfig(target_modules=["q_proj"], lora_bias=True))


# -- parameter counts --------------------------------------------------------------------------


def test_plan_params_follow_the_formulas_module_by_module(tiny_llama):
    config = BDLoraConfig(
        rank=8, nblocks=4, patterns={"q_proj": {"rank": 4}, r"layers\.1\.mlp\..*": {"rank": 12}}
    )
    plan = resolve_plan(tiny_llama, config)
    assert len(plan.modules) == len(linear_names(tiny_llama))
    for m in plan.modules:
        weight = tiny_llama.get_submodule(m.name).weight
        role = Role.COLUMN if m.name.endswith(COLUMN_LEAVES) else Role.ROW
        d_out, d_in = weight.shape
        rank = 4 if m.name.endswith("q_proj") else 12 if ".1.mlp." in m.name else 8
        assert (m.role, m.rank, m.d_in, m.d_out) == (role, rank, d_in, d_out)
        assert m.params == expected_params(role, d_in, d_out, rank, 4)
        assert m.lora_params == rank * (d_in + d_out)
    assert plan.params == sum(m.params for m in plan.modules)


def test_plan_params_equal_peft_trainable_count_module_by_module():
    lora_config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=ALL,
        use_bdlora=BdLoraConfig(**BD_LISTS, nblocks=2),
        rank_pattern={"q_proj": 4},
    )
    plan = resolve_plan(tiny_model(), BDLoraConfig.from_peft(lora_config))
    handwritten = resolve_plan(tiny_model(), BDLoraConfig(rank=8, alpha=16, patterns={"q_proj": {"rank": 4}}))
    assert plan.params == handwritten.params
    peft_model = get_peft_model(tiny_model(), lora_config)
    per_module: dict[str, int] = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            per_module[module] = per_module.get(module, 0) + param.numel()
    assert per_module == {m.name: m.params for m in plan.modules}
    assert peft_model.get_nb_trainable_parameters()[0] == plan.params
    assert plan["model.layers.0.self_attn.q_proj"].rank == 4


def test_plan_params_equal_adapter_factor_sizes(tiny_llama):
    config = BDLoraConfig(rank=8, nblocks=4, patterns={"v_proj": {"rank": 4}, "down_proj": None})
    apply_bdlora(tiny_llama, config)
    plan = resolve_plan(tiny_model(), config)
    for m in plan.modules:
        layer = tiny_llama.get_submodule(m.name)
        assert layer.lora_A["default"].numel() + layer.lora_B["default"].numel() == m.params
    trainable = sum(p.numel() for p in tiny_llama.parameters() if p.requires_grad)
    assert trainable == plan.params


def llama_3b_meta() -> nn.Module:
    config = LlamaConfig(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=1024,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_metamathqa_parameter_budget_from_bdlora_md():
    """PEFT's MetaMathQA run on Llama-3.2-3B, MLP only (BDLORA.md)."""
    model = llama_3b_meta()
    mlp = ["gate_proj", "up_proj", "down_proj"]
    bd = resolve_plan(model, BDLoraConfig(rank=14, alpha=28, nblocks=2, target_modules=mlp))
    lora = resolve_plan(model, BDLoraConfig(rank=10, alpha=20, nblocks=1, target_modules=mlp))
    assert len(bd.modules) == len(lora.modules) == 3 * 28
    assert bd.params == 8_429_568
    assert lora.params == 9_461_760
    assert lora.lora_params == lora.params
    assert bd.lora_params == 14 * (3072 + 8192) * 3 * 28


# -- role inference ----------------------------------------------------------------------------


def test_roles_come_from_the_tp_plan(tiny_llama):
    plan = resolve_plan(tiny_llama, BDLoraConfig())
    for m in plan.modules:
        column = m.name.endswith(COLUMN_LEAVES)
        assert m.role is (Role.COLUMN if column else Role.ROW)
        assert m.role_source == ("tp_plan:colwise" if column else "tp_plan:rowwise")
    assert not plan.notes


def test_unsupported_tp_style_names_module_and_style(tiny_llama):
    tp_plan = dict(tiny_llama.config.base_model_tp_plan)
    tp_plan["layers.*.mlp.up_proj"] = "gather"
    tiny_llama.config.base_model_tp_plan = tp_plan
    with pytest.raises(BDLoraConfigError, match=r"module 'model.layers.0.mlp.up_proj' has TP style 'gather'"):
        resolve_plan(tiny_llama, BDLoraConfig())
    plan = resolve_plan(tiny_llama, BDLoraConfig(patterns={"up_proj": {"role": "column"}}))
    assert plan["model.layers.0.mlp.up_proj"].role_source == "pattern 'up_proj'"


def test_without_tp_plan_roles_come_from_names_and_notes_say_so(tiny_llama):
    reference = resolve_plan(tiny_llama, BDLoraConfig())
    tiny_llama.config.base_model_tp_plan = None
    plan = resolve_plan(tiny_llama, BDLoraConfig())
    assert [(m.name, m.role) for m in plan.modules] == [(m.name, m.role) for m in reference.modules]
    assert {m.role_source for m in plan.modules} == {"name"}
    assert any("no base_model_tp_plan" in note for note in plan.notes)
    assert "note: " in plan.format()


def test_unknown_name_without_tp_plan_needs_a_role_override():
    model = nn.Sequential()
    model.add_module("mystery", nn.Linear(8, 8))
    with pytest.raises(BDLoraConfigError, match=r"'mystery'.*add a 'role' override"):
        resolve_plan(model, BDLoraConfig(target_modules=["mystery"]))
    plan = resolve_plan(
        model, BDLoraConfig(target_modules=["mystery"], patterns={"mystery": {"role": "row"}})
    )
    assert plan["mystery"].role is Role.ROW


# -- plan output and CLI -----------------------------------------------------------------------


def test_plan_format_has_rows_exclusions_and_totals(tiny_llama):
    config = BDLoraConfig(patterns={r"layers\.1\.mlp\.down_proj": None, "q_proj": {"rank": 4, "alpha": 8}})
    plan = resolve_plan(tiny_llama, config)
    text = plan.format(tp=2)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["module", "role"]
    assert "params/rank (tp=2)" in lines[0]
    q_row = next(line for line in lines if line.startswith("model.layers.{0-1}.self_attn.q_proj"))
    q_params = sum(m.params for m in plan.modules if m.name.endswith("q_proj"))
    assert q_row.split()[1:] == [
        "column",
        "tp_plan:colwise",
        "B",
        "(N=2)",
        "4",
        "8",
        "lora",
        "q_proj",
        f"{q_params:,}",
        f"{q_params // 2:,}",
    ]
    assert any(line.startswith("model.layers.{0}.mlp.down_proj") for line in lines)
    assert any(line.startswith("excluded") and "model.layers.{1}.mlp.down_proj" in line for line in lines)
    total = f"total: {len(plan.modules)} modules, {plan.params:,} BD-LoRA params vs {plan.lora_params:,}"
    assert total in text
    assert f"per TP rank (tp=2): {plan.params // 2:,} params" in text


def test_cli_plan_prints_a_table(capsys):
    assert main(["plan", "--model", "tiny-llama", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    plan = resolve_plan(tiny_model(), BDLoraConfig())
    assert "params/rank (tp=2)" in out
    assert "model.layers.{0-1}.mlp.down_proj" in out
    assert f"{plan.params:,} BD-LoRA params" in out


def test_cli_plan_reads_a_yaml_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    BDLoraConfig(target_modules=["q_proj"], patterns={r"layers\.0\..*": {"rank": 4}}).to_yaml(path)
    assert main(["plan", "--model", "tiny-llama", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("model.layers.{0}.self_attn.q_proj"))
    assert row.split()[5] == "4"
    assert "total: 2 modules" in out


def test_cli_bad_config_path_exits_2_with_message(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["plan", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "bdlora plan: error:" in err and str(missing) in err and "no such file" in err


def test_cli_invalid_config_exits_2_with_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rank: 8\npatterns:\n  q_proj: {rnak: 4}\n")
    assert main(["plan", "--config", str(path)]) == 2
    assert "did you mean 'rank'" in capsys.readouterr().err
