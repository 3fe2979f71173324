"""Heracles' list order (strategies.heracles) and strategy files (strategies.files).

The order tables are checked against the real models (registration order, which layers share an input)
and against an independent computation: HARP's resnet18 ERK list, read in Heracles' order, must be ERK of
the layers it lands on.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import models
from configs.errors import UserError
from strategies.allocation import allocate_keep_rates
from pruning.graph import inspect_layers
from pruning.wrap import prunable_layers
from strategies import shipped_strategy
from strategies.files import keep_rates_from_sparsity, load_strategy, read_strategies, save_strategies, \
    split_file_strategy
from strategies.heracles import HERACLES_ARCHS, list_from_rates, list_order, rates_from_list
from tests.conftest import single_thread
from tests.test_strategies import RAW_R18

LENGTHS = {("vgg16_bn", "weight"): 16, ("vgg16_bn", "channel"): 16, ("resnet18", "weight"): 21,
           ("resnet18", "channel"): 18, ("wrn_28_4", "weight"): 29, ("wrn_28_4", "channel"): 26,
           ("ResNet50", "weight"): 54, ("ResNet50", "channel"): 50}
TABLES = sorted(LENGTHS)


@pytest.fixture(scope="module")
def nets():
    """The real models: layer names in registration order and the groups of layers reading one tensor."""
    with single_thread():
        out = {}
        for arch in HERACLES_ARCHS:
            model = models.create_model(arch, num_classes=1000 if arch == "ResNet50" else 10)
            graph = inspect_layers(model, torch.zeros(1, 3, 32, 32))
            out[arch] = ([name for name, _ in prunable_layers(model)], graph.tie_groups)
    return out


def _names(nets, arch):
    return nets[arch][0]


# ------------------------------------------------------------------------------------------- order tables


def test_every_heracles_table_is_covered():
    assert set(HERACLES_ARCHS) == {"vgg16_bn", "resnet18", "wrn_28_4", "ResNet50"}


@pytest.mark.parametrize("arch, granularity", TABLES)
def test_table_lengths_and_coverage(nets, arch, granularity):
    names = _names(nets, arch)
    order = list_order(arch, granularity, names)
    assert len(order.positions) == LENGTHS[arch, granularity]
    assert len(set(order.positions)) == len(order.positions)
    assert sorted(order.positions + tuple(order.tied)) == sorted(names)
    assert order.layers == tuple(names)


@pytest.mark.parametrize("arch", HERACLES_ARCHS)
def test_weight_lists_put_each_shortcut_just_before_its_blocks_convs(nets, arch):
    names, ties = nets[arch]
    positions = list_order(arch, "weight", names).positions
    shortcut_of = {follower: owner for owner, follower in ties}  # {shortcut: the block's first conv}
    # Without the shortcuts the weight list is registration order ...
    assert [n for n in positions if n not in shortcut_of] == [n for n in names if n not in shortcut_of]
    # ... and each shortcut sits right before the conv that reads the same tensor (Heracles creates it first).
    for shortcut, conv1 in shortcut_of.items():
        assert positions.index(shortcut) + 1 == positions.index(conv1)


@pytest.mark.parametrize("arch", HERACLES_ARCHS)
def test_channel_lists_leave_out_the_shortcuts_which_follow_the_conv_reading_their_input(nets, arch):
    names, ties = nets[arch]
    order = list_order(arch, "channel", names)
    assert order.tied == {follower: owner for owner, follower in ties}
    assert list(order.positions) == [n for n in names if n not in order.tied]


def test_positions_spelled_out(nets):
    r18 = list_order("resnet18", "weight", _names(nets, "resnet18")).positions
    assert (r18[5], r18[6], r18[7], r18[10], r18[15], r18[20]) == (
        "layer2.0.shortcut.0", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.shortcut.0", "layer4.0.shortcut.0",
        "linear")
    wrn = list_order("wrn_28_4", "weight", _names(nets, "wrn_28_4")).positions
    assert (wrn[1], wrn[3], wrn[10], wrn[19], wrn[28]) == (
        "block1.layer.0.convShortcut", "block1.layer.0.conv2", "block2.layer.0.convShortcut",
        "block3.layer.0.convShortcut", "fc")
    # hydra-nonuniform reads 42 as layer4's shortcut; Heracles' ResNet50 creates it at 43.
    r50 = list_order("ResNet50", "weight", _names(nets, "ResNet50")).positions
    assert (r50[1], r50[11], r50[24], r50[42], r50[43], r50[44], r50[53]) == (
        "layer1.0.downsample.0", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer3.5.conv3",
        "layer4.0.downsample.0", "layer4.0.conv1", "fc")
    r18c = list_order("resnet18", "channel", _names(nets, "resnet18")).positions
    assert (r18c[5], r18c[9], r18c[13], r18c[17]) == ("layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1", "linear")


def test_uniform_list_imports_to_every_layer(nets):
    names = _names(nets, "resnet18")
    rates = rates_from_list(list_order("resnet18", "weight", names), [0.1] * 21)
    assert list(rates) == names and set(rates.values()) == {0.1}


def test_resnet18_erk_list_in_heracles_order_is_erk_by_name(nets):
    names = _names(nets, "resnet18")
    rates = rates_from_list(list_order("resnet18", "weight", names), RAW_R18["010_erk"])
    assert rates["layer2.0.shortcut.0"] == 1.0                      # index 5
    assert rates["layer2.0.conv1"] == 0.354383707046509             # index 6
    assert rates["layer2.0.conv2"] == 0.234469950199127             # index 7
    assert rates["layer4.0.shortcut.0"] == 0.775230407714844        # index 15
    assert rates["layer4.0.conv1"] == 0.086583435535431             # index 16
    assert rates["linear"] == 1.0                                   # index 20
    assert rates == shipped_strategy("resnet18", "weight", "010_erk")
    model = models.create_model("resnet18", num_classes=10)
    erk = allocate_keep_rates("erk", 0.1, {n: m.weight for n, m in prunable_layers(model)})
    assert max(abs(rates[n] - erk[n]) for n in names) < 1e-5
    # Read in registration order instead (HARP's bug), the same list is far from ERK.
    misread = dict(zip(names, RAW_R18["010_erk"]))
    assert max(abs(misread[n] - erk[n]) for n in names) > 0.5


def test_channel_list_gives_each_shortcut_its_blocks_conv1_value(nets):
    names = _names(nets, "resnet18")
    values = [round(0.05 * (i + 1), 2) for i in range(18)]
    rates = rates_from_list(list_order("resnet18", "channel", names), values)
    assert rates["layer2.0.conv1"] == rates["layer2.0.shortcut.0"] == values[5]
    assert rates["layer3.0.conv1"] == rates["layer3.0.shortcut.0"] == values[9]
    assert rates["layer4.0.conv1"] == rates["layer4.0.shortcut.0"] == values[13]
    assert rates["linear"] == values[17]


@pytest.mark.parametrize("arch, granularity", TABLES)
def test_list_round_trip_is_the_identity(nets, arch, granularity):
    order = list_order(arch, granularity, _names(nets, arch))
    values = [(i + 1) / (len(order.positions) + 1) for i in range(len(order.positions))]
    rates = rates_from_list(order, values)
    assert list_from_rates(order, rates) == values
    assert rates_from_list(order, list_from_rates(order, rates)) == rates


def test_other_architectures_use_registration_order():
    names = ["features.0", "features.3", "classifier.0"]
    for granularity in ("weight", "channel"):
        order = list_order("small_cnn", granularity, names)
        assert order.positions == tuple(names) and order.tied == {}
        assert rates_from_list(order, [0.5, 0.25, 1.0]) == {"features.0": 0.5, "features.3": 0.25, "classifier.0": 1.0}


def test_table_must_match_the_models_layers(nets):
    with pytest.raises(UserError, match="do not match Heracles' resnet18 table"):
        list_order("resnet18", "weight", _names(nets, "resnet18")[:-1])


def test_tied_layers_must_agree_to_be_exported(nets):
    order = list_order("resnet18", "channel", _names(nets, "resnet18"))
    rates = {n: 0.5 for n in order.layers}
    rates["layer3.0.shortcut.0"] = 0.25
    with pytest.raises(UserError, match="layer3.0.shortcut.0 keeps 0.25 but layer3.0.conv1 keeps 0.5"):
        list_from_rates(order, rates)


# ------------------------------------------------------------------------------------------------- files


def _write_heracles(path, document):
    path.write_text(json.dumps(document))
    return path


def test_split_file_strategy():
    assert split_file_strategy("010_uni") is None
    assert split_file_strategy("runs/a.yaml:005_x") == (Path("runs/a.yaml"), "005_x")
    assert split_file_strategy("stg/CIFAR10.json") == (Path("stg/CIFAR10.json"), None)
    assert split_file_strategy("my.stg.YML:a") is not None


def test_load_heracles_json(tmp_path, nets):
    names = _names(nets, "resnet18")
    f = _write_heracles(tmp_path / "CIFAR10.json", {
        "resnet18": {"weight": {"010_uni": [0.1] * 21, "010_erk": RAW_R18["010_erk"]},
                     "channel": {"05_uni": [0.5] * 18}},
        "vgg16_bn": {"weight": {"010_uni": [0.1] * 16}}})
    loaded = load_strategy(f"{f}:010_erk", arch="resnet18", granularity="weight", layer_names=names)
    assert loaded.rates == shipped_strategy("resnet18", "weight", "010_erk")
    assert (loaded.stg_id, loaded.label) == ("010_erk", "CIFAR10-010_erk")
    # A file with exactly one strategy for this arch/granularity needs no id.
    channel = load_strategy(str(f), arch="resnet18", granularity="channel", layer_names=names)
    assert channel.stg_id == "05_uni" and set(channel.rates.values()) == {0.5} and len(channel.rates) == 21


def test_save_then_read_is_the_identity_in_both_formats(tmp_path, nets):
    for arch, granularity in TABLES:
        order = list_order(arch, granularity, _names(nets, arch))
        values = [math.sqrt((i + 1) / (len(order.positions) + 2)) for i in range(len(order.positions))]
        rates = rates_from_list(order, values)
        for path in (tmp_path / "all.json", tmp_path / f"{arch}.yaml"):  # one JSON holds every arch
            save_strategies(path, {"005_a": rates}, arch=arch, granularity=granularity, layer_names=order.layers,
                            overwrite=True)
            back = read_strategies(path, arch=arch, granularity=granularity, layer_names=order.layers)
            assert back["005_a"] == rates and list(back["005_a"]) == list(order.layers)
        # The JSON is a Heracles list file, in Heracles' order.
        assert json.loads((tmp_path / "all.json").read_text())[arch][granularity]["005_a"] == values


def test_yaml_layout_and_merging(tmp_path):
    names = ["features.0", "classifier.0"]
    path = tmp_path / "small.yaml"
    save_strategies(path, {"005_a": {"features.0": 0.5, "classifier.0": 0.02}}, arch="small_cnn",
                    granularity="weight", layer_names=names)
    save_strategies(path, {"005_b": {"classifier.0": 0.1, "features.0": 0.3}}, arch="small_cnn",
                    granularity="weight", layer_names=names)
    save_strategies(path, {"original": {"features.0": 1.0, "classifier.0": 1.0}}, arch="small_cnn",
                    granularity="channel", layer_names=names)
    document = yaml.safe_load(path.read_text())
    assert document == {"arch": "small_cnn",
                        "weight": {"005_a": {"features.0": 0.5, "classifier.0": 0.02},
                                   "005_b": {"features.0": 0.3, "classifier.0": 0.1}},
                        "channel": {"original": {"features.0": 1.0, "classifier.0": 1.0}}}
    with pytest.raises(UserError, match="already has a different small_cnn weight strategy '005_a'"):
        save_strategies(path, {"005_a": {"features.0": 0.4, "classifier.0": 0.02}}, arch="small_cnn",
                        granularity="weight", layer_names=names)
    save_strategies(path, {"005_a": {"features.0": 0.4, "classifier.0": 0.02}}, arch="small_cnn",
                    granularity="weight", layer_names=names, overwrite=True)
    back = read_strategies(path, arch="small_cnn", granularity="weight", layer_names=names)
    assert back["005_a"]["features.0"] == 0.4


def test_json_export_keeps_other_architectures(tmp_path, nets):
    path = _write_heracles(tmp_path / "h.json", {"vgg16_bn": {"weight": {"010_uni": [0.1] * 16}}})
    names = _names(nets, "resnet18")
    save_strategies(path, {"010_x": {n: 0.2 for n in names}}, arch="resnet18", granularity="weight",
                    layer_names=names)
    document = json.loads(path.read_text())
    assert document["vgg16_bn"] == {"weight": {"010_uni": [0.1] * 16}}
    assert document["resnet18"]["weight"]["010_x"] == [0.2] * 21


def test_export_a_learned_sparsity_report(tmp_path):
    report = {"global_keep": 0.05, "per_layer": {"features.0": {"kept": 288, "total": 576, "keep": 0.5, "rate": 0.5},
                                                 "classifier.0": {"kept": 10, "total": 1000, "keep": 0.01,
                                                                  "rate": 0.0101}}}
    rates = keep_rates_from_sparsity(report)
    assert rates == {"features.0": 0.5, "classifier.0": 0.01}
    path = save_strategies(tmp_path / "learned.json", {"harp": rates}, arch="small_cnn", granularity="weight",
                           layer_names=list(rates))
    assert json.loads(path.read_text()) == {"small_cnn": {"weight": {"harp": [0.5, 0.01]}}}


# ------------------------------------------------------------------------------------------- bad inputs


def _one_line_error(call):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def heracles_file(tmp_path):
    return _write_heracles(tmp_path / "CIFAR10.json", {
        "resnet18": {"weight": {"010_0": [0.2] * 21, "010_1": [0.3] * 21, "short": [0.1] * 20,
                                "big": [0.1] * 20 + [1.5]}}})


def test_bad_strategy_arguments_give_one_line_errors(tmp_path, heracles_file, nets):
    names = _names(nets, "resnet18")

    def load(value, arch="resnet18", granularity="weight", layer_names=names):
        return lambda: load_strategy(value, arch=arch, granularity=granularity, layer_names=layer_names)

    assert "does not exist" in _one_line_error(load(str(tmp_path / "nope.json") + ":010_0"))
    message = _one_line_error(load(f"{heracles_file}:010_9"))
    assert "'010_9'" in message and "010_0, 010_1, big, short" in message
    assert "choose one" in _one_line_error(load(str(heracles_file)))
    assert "no strategies for arch 'vgg16_bn'; it has resnet18" in _one_line_error(
        load(f"{heracles_file}:010_0", arch="vgg16_bn", layer_names=_names(nets, "vgg16_bn")))
    assert "no channel strategies for resnet18; it has weight" in _one_line_error(
        load(f"{heracles_file}:010_0", granularity="channel"))
    assert "has 20 entries, but Heracles' resnet18 weight order has 21" in _one_line_error(
        load(f"{heracles_file}:short"))
    assert "entry 20 (linear) is 1.5, not a keep ratio in (0, 1]" in _one_line_error(load(f"{heracles_file}:big"))
    assert "names no strategy file" in _one_line_error(load("010_uni"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("arch: resnet18\nweight: {a: [\n")
    assert "is not valid YAML" in _one_line_error(load(f"{broken}:a"))


def test_bad_yaml_files_give_one_line_errors(tmp_path):
    names = ["features.0", "classifier.0"]

    def load(text, value_suffix=":a", arch="small_cnn"):
        path = tmp_path / "s.yaml"
        path.write_text(text)
        return lambda: load_strategy(f"{path}{value_suffix}", arch=arch, granularity="weight", layer_names=names)

    good = "weight:\n  a: {features.0: 0.5, classifier.0: 0.1}\n"
    assert load("arch: small_cnn\n" + good)() is not None
    assert "made for arch 'small_cnn', not 'vgg16_bn'" in _one_line_error(load("arch: small_cnn\n" + good,
                                                                               arch="vgg16_bn"))
    assert "missing ['classifier.0'], unknown ['fc']" in _one_line_error(
        load("arch: small_cnn\nweight:\n  a: {features.0: 0.5, fc: 0.1}\n"))
    unquoted_id = "arch: small_cnn\nweight:\n  010_0: {features.0: 0.5, classifier.0: 0.1}\n"
    assert "quote it" in _one_line_error(load(unquoted_id))
    assert "unknown keys ['strategies']" in _one_line_error(load("arch: small_cnn\nstrategies: {}\n" + good))
    assert "expected a mapping with 'arch'" in _one_line_error(load(good))
    assert "layer features.0 is 0, not a keep ratio" in _one_line_error(
        load("arch: small_cnn\nweight:\n  a: {features.0: 0, classifier.0: 0.1}\n"))
    assert "no weight strategies" in _one_line_error(load("arch: small_cnn\nchannel:\n  a: {features.0: 1}\n"))


def test_saving_rejects_bad_input(tmp_path):
    names = ["features.0", "classifier.0"]
    ok = {"features.0": 0.5, "classifier.0": 0.1}
    assert "must end in" in _one_line_error(lambda: save_strategies(
        tmp_path / "s.txt", {"a": ok}, arch="small_cnn", granularity="weight", layer_names=names))
    assert "without ':'" in _one_line_error(lambda: save_strategies(
        tmp_path / "s.yaml", {"a:b": ok}, arch="small_cnn", granularity="weight", layer_names=names))
    assert "missing ['classifier.0']" in _one_line_error(lambda: save_strategies(
        tmp_path / "s.yaml", {"a": {"features.0": 0.5}}, arch="small_cnn", granularity="weight", layer_names=names))
    assert not (tmp_path / "s.yaml").exists()
