"""Per-group and per-layer-band settings: expanded into pattern keys, reachable from Hydra and plan."""

import pytest
from hydra import compose, initialize_config_module

from bdlora import BDLoraConfig
from bdlora.cli import main as cli_main
from bdlora.config import BDLoraConfigError, group_band_patterns, parse_layers
from bdlora.plan import resolve_plan
from bdlora.presets import build_model
from bdlora.train.config import load_train_config, register_configs

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def ranks(config: BDLoraConfig, layers: int = 4) -> dict[tuple[int, str], int]:
    return {
        (i, m): config.match(f"model.layers.{i}.{'self_attn' if m in ATTN else 'mlp'}.{m}")[1].rank
        for i in range(layers)
        for m in ATTN + MLP
    }


def test_groups_and_bands_set_ranks_with_the_band_winning_where_both_set_one():
    config = BDLoraConfig.from_dict(
        {
            "rank": 8,
            "groups": {"attn": {"modules": ATTN, "rank": 4}, "mlp": {"modules": MLP, "rank": None}},
            "bands": {"late": {"layers": "2-3", "rank": 16}, "first": {"layers": [0], "alpha": 2.0}},
        }
    )
    got = ranks(config)
    for (layer, module), rank in got.items():
        expected = 16 if layer >= 2 else (4 if module in ATTN else 8)
        assert rank == expected, (layer, module, rank)
    # settings of different keys combine: layer 0's attention keeps the group's rank and the band's alpha
    first_q = config.match("model.layers.0.self_attn.q_proj")[1]
    assert (first_q.rank, first_q.alpha) == (4, 2.0)
    assert config.match("model.layers.1.self_attn.q_proj")[1].alpha == 16.0


def test_explicit_patterns_come_before_generated_keys():
    config = BDLoraConfig.from_dict(
        {
            "patterns": {r"layers\.0\.self_attn\.q_proj": {"rank": 2}},
            "groups": {"attn": {"modules": ATTN, "rank": 4}},
        }
    )
    assert config.match("model.layers.0.self_attn.q_proj")[1].rank == 2
    assert config.match("model.layers.0.self_attn.k_proj")[1].rank == 4


def test_a_group_or_band_setting_nothing_adds_no_key():
    assert group_band_patterns({"attn": {"modules": ATTN, "rank": None}}, {"b": {"layers": "0"}}) == {}


@pytest.mark.parametrize(
    ("groups", "bands", "message"),
    [
        ({"attn": {"modules": [], "rank": 4}}, {}, "groups.attn.modules: give a non-empty list"),
        ({"attn": {"modules": "q_proj", "rank": 4}}, {}, "groups.attn.modules: give a non-empty list"),
        ({"attn": {"modules": ATTN, "rnk": 4}}, {}, "groups.attn: unknown key 'rnk'; did you mean 'rank'"),
        ({}, {"late": {"rank": 4}}, "bands.late: needs 'layers'"),
        (
            {},
            {"late": {"layers": "3-1", "rank": 4}},
            "bands.late.layers: '3-1' is not a layer index or range",
        ),
        ({}, {"late": {"layers": "x", "rank": 4}}, "bands.late.layers: 'x' is not"),
    ],
)
def test_bad_groups_and_bands_name_the_key(groups, bands, message):
    with pytest.raises(BDLoraConfigError, match=message.replace("(", r"\(")):
        group_band_patterns(groups, bands)


def test_a_bad_rank_in_a_group_names_the_generated_key():
    with pytest.raises(BDLoraConfigError, match="rank 3 is not divisible by nblocks=2"):
        BDLoraConfig.from_dict({"groups": {"attn": {"modules": ATTN, "rank": 3}}})


def test_layer_specs():
    assert parse_layers("0-3,8", "x") == [0, 1, 2, 3, 8]
    assert parse_layers(5, "x") == [5]
    assert parse_layers([2, 1, 2], "x") == [1, 2]


def compose_adapter(*overrides: str) -> BDLoraConfig:
    register_configs()
    with initialize_config_module("bdlora.conf", version_base="1.3"):
        return load_train_config(compose("config", overrides=list(overrides))).adapter.build()


def test_hydra_overrides_reach_groups_and_bands():
    config = compose_adapter(
        "adapter.groups.attn.rank=4",
        "adapter.groups.mlp.rank=16",
        '+adapter.bands.late={layers: "1", rank: 32}',
    )
    got = ranks(config, layers=2)
    assert {got[0, m] for m in ATTN} == {4} and {got[0, m] for m in MLP} == {16}
    assert set(got[1, m] for m in ATTN + MLP) == {32}
    # a band given key by key, as a sweep over its rank would
    config = compose_adapter("+adapter.bands.early.layers=0", "+adapter.bands.early.rank=2")
    assert ranks(config, layers=2)[0, "q_proj"] == 2 and ranks(config, layers=2)[1, "q_proj"] == 8


def test_plan_takes_the_trainer_settings_and_agrees_with_the_resolved_plan(capsys):
    overrides = ["adapter.groups.attn.rank=4", '+adapter.bands.late={layers: "1", rank: 16}']
    assert cli_main(["plan", "--tp", "2", *overrides]) == 0
    out = capsys.readouterr().out
    expected = resolve_plan(build_model("tiny-llama", device="meta"), compose_adapter(*overrides))
    assert f"total: 14 modules, {expected.params:,} BD-LoRA params" in out
    assert {m.rank for m in expected.modules} == {4, 8, 16}


def test_plan_rejects_a_mistyped_group_with_hydras_hint(capsys):
    assert cli_main(["plan", "adapter.groups.atn.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "'adapter.groups' has no entry 'atn'" in err and "'+adapter.groups.atn" in err
