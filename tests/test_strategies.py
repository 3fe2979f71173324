"""Strategy ids, the shipped per-layer lists, and keep-rate allocation (uni / erk / lamp / original).

Layer names and shapes are hard-coded from the AP benchmark's base models so these tests do not depend on
models/. Reference densities were computed with the original code's functions.
"""

from __future__ import annotations

import math

import pytest
import torch

from configs.errors import UserError
from strategies.allocation import allocate_keep_rates
from strategies import RULES, parse_strategy_id, shipped_ids, shipped_strategy
from strategies.files import save_strategies
from strategies.start import start_rates

# ---------------------------------------------------------------------------------------------------
# Architectures (the AP benchmark's base models), prunable layers in module registration order.

VGG16_BN = {
    "features.0": (64, 3, 3, 3),
    "features.3": (64, 64, 3, 3),
    "features.7": (128, 64, 3, 3),
    "features.10": (128, 128, 3, 3),
    "features.14": (256, 128, 3, 3),
    "features.17": (256, 256, 3, 3),
    "features.20": (256, 256, 3, 3),
    "features.24": (512, 256, 3, 3),
    "features.27": (512, 512, 3, 3),
    "features.30": (512, 512, 3, 3),
    "features.34": (512, 512, 3, 3),
    "features.37": (512, 512, 3, 3),
    "features.40": (512, 512, 3, 3),
    "classifier.0": (256, 2048),
    "classifier.2": (256, 256),
    "classifier.4": (10, 256),
}

RESNET18 = {"conv1": (64, 3, 3, 3)}
for _blk in range(2):
    RESNET18[f"layer1.{_blk}.conv1"] = (64, 64, 3, 3)
    RESNET18[f"layer1.{_blk}.conv2"] = (64, 64, 3, 3)
for _stage, (_cin, _c) in {2: (64, 128), 3: (128, 256), 4: (256, 512)}.items():
    RESNET18[f"layer{_stage}.0.conv1"] = (_c, _cin, 3, 3)
    RESNET18[f"layer{_stage}.0.conv2"] = (_c, _c, 3, 3)
    RESNET18[f"layer{_stage}.0.shortcut.0"] = (_c, _cin, 1, 1)
    RESNET18[f"layer{_stage}.1.conv1"] = (_c, _c, 3, 3)
    RESNET18[f"layer{_stage}.1.conv2"] = (_c, _c, 3, 3)
RESNET18["linear"] = (10, 512)

# The raw 21-entry lists from the original configs/strategies.json (resnet18, weight).
RAW_R18 = {
    "010_lamp": [0.825810194015503, 0.591769754886627, 0.642876505851746, 0.626573383808136,
                 0.652723550796509, 0.8175048828125, 0.5126953125, 0.343939900398254, 0.35504150390625,
                 0.370103597640991, 0.6851806640625, 0.233849406242371, 0.131696939468384,
                 0.140367269515991, 0.147813558578491, 0.436264038085938, 0.082941710948944,
                 0.044330179691315, 0.044753193855286, 0.047339558601379, 0.827539086341858],
    "010_erk": [1, 0.479682087898254, 0.479682087898254, 0.479682087898254, 0.479682087898254, 1,
                0.354383707046509, 0.234469950199127, 0.234469950199127, 0.234469950199127, 1,
                0.174509704113007, 0.115892171859741, 0.115892171859741, 0.115892171859741,
                0.775230407714844, 0.086583435535431, 0.057610809803009, 0.057610809803009,
                0.057610809803009, 1],
}
RAW_VGG = {
    "010_lamp": [0.809027791023254, 0.658040344715118, 0.556328654289246, 0.450907349586487,
                 0.318227171897888, 0.209515035152435, 0.208372354507446, 0.122057616710663,
                 0.069378316402435, 0.068788766860962, 0.067314982414246, 0.067824482917786,
                 0.067981719970703, 0.156400680541992, 0.358383178710937, 0.829296886920929],
    "010_erk": [1, 0.518039286136627, 0.382717549800873, 0.253214478492737, 0.188462972640991,
                0.125157654285431, 0.125157654285431, 0.093505859375, 0.062216460704804,
                0.062216460704804, 0.062216460704804, 0.062216460704804, 0.062216460704804,
                0.626272201538086, 1, 1],
}


def _numel(shape):
    return math.prod(shape)


def _density(rates, shapes):
    return sum(rates[n] * _numel(shapes[n]) for n in shapes) / sum(_numel(s) for s in shapes.values())


def _shortcut_first_order():
    """The order the resnet18 lists were produced in: each stage's shortcut before its convs."""
    order = ["conv1"] + [n for n in RESNET18 if n.startswith("layer1.")]
    for stage in (2, 3, 4):
        order.append(f"layer{stage}.0.shortcut.0")
        order += [n for n in RESNET18 if n.startswith(f"layer{stage}.") and "shortcut" not in n]
    return order + ["linear"]


def _zero_weights(shapes):
    # Expanded zero scalars: the right shapes at no memory cost (ERK reads shapes only).
    return {n: torch.zeros(()).expand(s) for n, s in shapes.items()}


def _random_weights(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------
# Strategy ids


@pytest.mark.parametrize(
    "stg_id, expected",
    [
        ("010_uni", (0.1, "uni")),
        ("001_lamp", (0.01, "lamp")),
        ("0001_erk", (0.001, "erk")),
        ("005_erk", (0.05, "erk")),
        ("050_uni", (0.5, "uni")),
        ("100_uni", (1.0, "uni")),
        ("original", (1.0, "original")),
    ],
)
def test_parse_valid_ids(stg_id, expected):
    density, rule = parse_strategy_id(stg_id)
    assert rule == expected[1] and rule in RULES
    assert density == pytest.approx(expected[0], rel=1e-12)


@pytest.mark.parametrize(
    "stg_id", ["10_uni", "010_foo", "000_uni", "abc", "200_uni", "010_original", "010uni", "", "010_UNI"]
)
def test_parse_malformed_ids_raise_user_error_listing_valid_forms(stg_id):
    with pytest.raises(UserError) as info:
        parse_strategy_id(stg_id)
    msg = str(info.value)
    assert repr(stg_id) in msg
    for form in ("010", "uni", "erk", "lamp", "original"):
        assert form in msg
    # It names the shipped lists too.
    assert "vgg16_bn/weight: 010_erk, 010_lamp" in msg
    assert "resnet18/weight: 010_erk, 010_lamp" in msg


def test_shipped_ids_are_parseable():
    for arch in ("vgg16_bn", "resnet18"):
        ids = shipped_ids(arch, "weight")
        assert ids == ["010_erk", "010_lamp"]
        for stg_id in ids:
            assert parse_strategy_id(stg_id) == (pytest.approx(0.1), stg_id.split("_")[1])


def test_not_shipped_is_none():
    assert shipped_strategy("vgg16_bn", "weight", "010_uni") is None  # computable, not shipped
    assert shipped_strategy("vgg16_bn", "channel", "original") is None
    assert shipped_strategy("ResNet50", "weight", "010_uni") is None
    assert shipped_strategy("wrn_28_4", "weight", "010_lamp") is None
    assert shipped_strategy("../configs/x", "weight", "010_lamp") is None
    assert shipped_ids("ResNet50", "weight") == []
    assert shipped_ids("resnet18", "channel") == []


def test_shipped_returns_a_fresh_copy():
    a = shipped_strategy("vgg16_bn", "weight", "010_lamp")
    a["features.0"] = 0.5
    assert shipped_strategy("vgg16_bn", "weight", "010_lamp")["features.0"] == pytest.approx(0.809027791023254)


# ---------------------------------------------------------------------------------------------------
# Shipped lists


@pytest.mark.parametrize("arch, shapes", [("vgg16_bn", VGG16_BN), ("resnet18", RESNET18)])
@pytest.mark.parametrize("stg_id", ["010_lamp", "010_erk"])
def test_shipped_lists_match_layer_names_and_global_density(arch, shapes, stg_id):
    rates = shipped_strategy(arch, "weight", stg_id)
    assert set(rates) == set(shapes)
    assert len(rates) == len(shapes)
    assert all(0.0 < r <= 1.0 for r in rates.values())
    assert round(_density(rates, shapes), 5) == 0.10000


def test_prunable_weight_totals():
    assert sum(_numel(s) for s in VGG16_BN.values()) == 15_302_848
    assert sum(_numel(s) for s in RESNET18.values()) == 11_164_352


def test_vgg_lists_are_the_original_registration_order():
    for stg_id, raw in RAW_VGG.items():
        shipped = shipped_strategy("vgg16_bn", "weight", stg_id)
        assert [shipped[n] for n in VGG16_BN] == pytest.approx(raw, abs=0)


def test_resnet18_lists_are_realigned_shortcut_first():
    order = _shortcut_first_order()
    assert len(order) == 21 and [order[i] for i in (5, 10, 15)] == [
        "layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    registration = list(RESNET18)  # shortcuts at 7, 12, 17: HARP's (buggy) map
    assert [registration[i] for i in (7, 12, 17)] == [
        "layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    harp_expected = {"010_lamp": 0.16048, "010_erk": 0.19805}  # computed with the original code's functions
    for stg_id, raw in RAW_R18.items():
        shipped = shipped_strategy("resnet18", "weight", stg_id)
        assert [shipped[n] for n in order] == pytest.approx(raw, abs=0)
        realigned = dict(zip(order, raw))
        assert round(_density(realigned, RESNET18), 5) == 0.10000
        harp_mapped = dict(zip(registration, raw))
        assert round(_density(harp_mapped, RESNET18), 5) == harp_expected[stg_id]


# ---------------------------------------------------------------------------------------------------
# Allocation


@pytest.mark.parametrize("shapes", [VGG16_BN, RESNET18])
@pytest.mark.parametrize("density", [0.1, 0.05, 0.01, 0.5])
def test_erk_exact_global_density_and_bounds(shapes, density):
    rates = allocate_keep_rates("erk", density, _zero_weights(shapes))
    assert list(rates) == list(shapes)
    assert all(0.0 < r <= 1.0 for r in rates.values())
    assert _density(rates, shapes) == pytest.approx(density, rel=1e-9)


@pytest.mark.parametrize("arch, shapes", [("vgg16_bn", VGG16_BN), ("resnet18", RESNET18)])
def test_erk_reproduces_the_shipped_lists(arch, shapes):
    computed = allocate_keep_rates("erk", 0.1, _zero_weights(shapes))
    shipped = shipped_strategy(arch, "weight", "010_erk")
    diff = max(abs(computed[n] - shipped[n]) for n in shapes)
    assert diff < 2e-5  # measured: 1.14e-5 (vgg16_bn), 6.1e-6 (resnet18)
    for n in shapes:  # the capped layers agree exactly
        assert (shipped[n] == 1.0) == (computed[n] == 1.0)


def test_erk_caps_iteratively():
    # The first solve caps only "a"; re-solving for the rest raises eps and pushes "c" above 1, so it is
    # capped in a second pass and "b" takes the whole remaining budget.
    shapes = {"a": (16, 3), "b": (64, 64, 3, 3), "c": (48, 48)}
    n = {k: _numel(s) for k, s in shapes.items()}
    raw = {k: sum(s) / n[k] for k, s in shapes.items()}
    eps_first = 0.15 * sum(n.values()) / sum(n[k] * raw[k] for k in shapes)
    assert eps_first * raw["a"] > 1.0 > eps_first * raw["c"]  # the scenario really needs two passes
    rates = allocate_keep_rates("erk", 0.15, _zero_weights(shapes))
    assert rates["a"] == rates["c"] == 1.0
    assert rates["b"] == pytest.approx((0.15 * sum(n.values()) - n["a"] - n["c"]) / n["b"], rel=1e-12)
    # Here only the tiny layers are capped and the uncapped ones keep the ERK ratio between them.
    shapes = {"a": (4, 3), "b": (64, 64, 3, 3), "c": (8, 8, 1, 1), "d": (64, 512)}
    rates = allocate_keep_rates("erk", 0.3, _zero_weights(shapes))
    assert rates["a"] == rates["c"] == 1.0 and rates["b"] < 1.0 and rates["d"] < 1.0
    assert _density(rates, shapes) == pytest.approx(0.3, rel=1e-12)
    assert rates["b"] / rates["d"] == pytest.approx(
        (sum(shapes["b"]) / _numel(shapes["b"])) / (sum(shapes["d"]) / _numel(shapes["d"])))
    assert allocate_keep_rates("erk", 1.0, _zero_weights(shapes)) == {n: 1.0 for n in shapes}


def test_uni_and_original():
    weights = _zero_weights(RESNET18)
    assert allocate_keep_rates("uni", 0.05, weights) == {n: 0.05 for n in RESNET18}
    assert list(allocate_keep_rates("uni", 0.05, weights)) == list(RESNET18)
    assert allocate_keep_rates("original", 0.1, weights) == {n: 1.0 for n in RESNET18}


def test_unknown_rule_and_bad_density():
    weights = _zero_weights({"a": (2, 2)})
    with pytest.raises(ValueError, match="unknown allocation rule"):
        allocate_keep_rates("foo", 0.1, weights)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            allocate_keep_rates("uni", bad, weights)
    with pytest.raises(ValueError):
        allocate_keep_rates("uni", 0.1, {})


# Small shapes so LAMP runs fast; N = 75,546 so density*N is not an integer for these densities.
SMALL = {
    "conv1": (16, 3, 3, 3),
    "conv2": (32, 16, 3, 3),
    "conv3": (64, 32, 3, 3),
    "short": (64, 16, 1, 1),
    "fc1": (128, 256),
    "fc2": (10, 128),
}


def _brute_force_lamp_counts(weights, keep_total):
    """Reference LAMP: score every weight independently in Python order, keep the global top."""
    entries = []
    for li, w in enumerate(weights.values()):
        sq = sorted(float(x) ** 2 for x in w.reshape(-1))
        suffix = 0.0
        for v in reversed(sq):
            suffix += v
            entries.append((v / suffix, li))
    entries.sort(key=lambda e: -e[0])
    counts = [0] * len(weights)
    for _, li in entries[:keep_total]:
        counts[li] += 1
    return counts


@pytest.mark.parametrize("density", [0.1, 0.013, 0.5, 0.9])
def test_lamp_exact_global_density_and_bounds(density):
    weights = _random_weights(SMALL)
    rates = allocate_keep_rates("lamp", density, weights)
    assert list(rates) == list(SMALL)
    assert all(0.0 < r <= 1.0 for r in rates.values())
    assert _density(rates, SMALL) == pytest.approx(density, rel=1e-9)


def test_lamp_matches_brute_force_counts():
    shapes = {"a": (8, 4, 3, 3), "b": (16, 8, 3, 3), "c": (10, 64)}
    weights = _random_weights(shapes, seed=3)
    n_total = sum(_numel(s) for s in shapes.values())
    keep_total = 300  # density*N integral: no fractional remainder
    rates = allocate_keep_rates("lamp", keep_total / n_total, weights)
    counts = [round(rates[n] * _numel(shapes[n])) for n in shapes]
    assert sum(counts) == keep_total
    assert counts == _brute_force_lamp_counts(weights, keep_total)


def test_lamp_is_monotone_in_density():
    weights = _random_weights(SMALL, seed=1)
    previous = None
    for density in (0.01, 0.05, 0.1, 0.3, 0.7):
        rates = allocate_keep_rates("lamp", density, weights)
        kept = {n: math.floor(rates[n] * _numel(SMALL[n]) + 1e-6) for n in SMALL}
        if previous is not None:
            assert all(kept[n] >= previous[n] for n in SMALL)
        previous = kept


def test_lamp_is_layer_scale_invariant_and_reads_the_within_layer_distribution():
    weights = _random_weights(SMALL, seed=2)
    base = allocate_keep_rates("lamp", 0.1, weights)
    # LAMP normalises within each layer, so rescaling a whole layer changes nothing
    # (unlike global magnitude pruning, which would keep more of the scaled-up layer).
    scaled = dict(weights, conv3=weights["conv3"] * 100.0)
    assert allocate_keep_rates("lamp", 0.1, scaled) == pytest.approx(base, rel=1e-6)
    # Making a layer's few large weights larger concentrates its energy in them: the large weights'
    # scores are unchanged (their suffix sums scale alike) while every smaller weight's score drops,
    # so the layer keeps fewer weights and the others absorb the budget (the total stays exact).
    w = weights["conv3"]
    boosted = dict(weights, conv3=w * (1.0 + 4.0 * (w.abs() > 2.0)))  # ~4.6 % of conv3, under its keep
    fewer = allocate_keep_rates("lamp", 0.1, boosted)
    assert fewer["conv3"] < base["conv3"]
    assert all(fewer[n] >= base[n] for n in SMALL if n != "conv3")
    assert _density(fewer, SMALL) == pytest.approx(0.1, rel=1e-9)


def test_lamp_every_layer_keeps_a_weight():
    shapes = {"a": (32, 32), "dead": (16, 16), "b": (8, 8)}
    weights = _random_weights(shapes, seed=4)
    weights["dead"] = torch.zeros(16, 16)  # all-zero layer: every LAMP score is 0
    rates = allocate_keep_rates("lamp", 0.05, weights)
    assert rates["dead"] * 256 == pytest.approx(1.0)
    assert all(0.0 < r <= 1.0 for r in rates.values())
    assert _density(rates, shapes) == pytest.approx(0.05, rel=1e-9)
    # Fewer weights kept than layers: each layer keeps one, above the requested density (documented).
    tiny = allocate_keep_rates("lamp", 1e-4, weights)
    assert [tiny[n] * _numel(shapes[n]) for n in shapes] == pytest.approx([1.0, 1.0, 1.0])


def test_lamp_rejects_non_finite_weights():
    with pytest.raises(ValueError, match="finite"):
        allocate_keep_rates("lamp", 0.1, {"a": torch.tensor([[1.0, float("nan")]])})


def test_layering_imports():
    """strategies/ imports only stdlib, yaml and configs.errors; strategies/allocation.py no models/strategies."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]

    def imported(path):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module)
        return mods

    project = {"configs", "strategies", "models", "data", "trainers", "pruning", "utils"}
    for mod in imported(root / "strategies" / "__init__.py"):
        if mod.split(".")[0] in project:
            assert mod == "configs.errors", mod
    for mod in imported(root / "strategies" / "allocation.py"):
        assert mod.split(".")[0] not in {"models", "data", "trainers", "strategies"}, mod


def test_every_rule_of_the_grammar_allocates():
    weights = {name: torch.randn(shape, generator=torch.Generator().manual_seed(1)) for name, shape in SMALL.items()}
    for rule in RULES:
        rates = allocate_keep_rates(rule, 0.2, weights)
        assert list(rates) == list(SMALL) and all(0.0 < r <= 1.0 for r in rates.values())


def test_start_rates_come_from_a_file_a_shipped_list_or_a_rule(tmp_path):
    """strategies.start.start_rates, the stage's one question: FILE:ID reads the file, an id with a shipped list
    for the arch gives that list, any other id is computed by its rule from the layers' weights."""
    weights = {name: torch.randn(shape, generator=torch.Generator().manual_seed(2)) for name, shape in SMALL.items()}
    computed = start_rates("020_lamp", arch="small", granularity="weight", weights=weights)
    assert computed == allocate_keep_rates("lamp", 0.2, weights)

    zeros = _zero_weights(RESNET18)
    shipped = start_rates("010_lamp", arch="resnet18", granularity="weight", weights=zeros)
    assert shipped == shipped_strategy("resnet18", "weight", "010_lamp") and set(shipped) == set(RESNET18)
    assert shipped != allocate_keep_rates("erk", 0.1, zeros)

    mine = {name: 0.1 + 0.1 * i for i, name in enumerate(SMALL)}
    path = save_strategies(tmp_path / "mine.yaml", {"found": mine}, arch="small", granularity="weight",
                           layer_names=list(SMALL))
    assert start_rates(f"{path}:found", arch="small", granularity="weight", weights=weights) == pytest.approx(mine)

    with pytest.raises(UserError, match="invalid strategy id"):
        start_rates("10_uni", arch="small", granularity="weight", weights=weights)
    with pytest.raises(UserError):
        start_rates(f"{path}:missing", arch="small", granularity="weight", weights=weights)
