"""Tests for models/: every registered architecture, the benchmark layouts (§B.8), normalisation, identity ties."""
import math

import pytest
import torch
from torch import nn

from configs.errors import UserError
from models import MODELS, create_model, list_models
from models.common import InputNormalize

# Input size and class count per architecture, chosen to keep the whole file fast on a 2-core CPU. The global
# pooling heads accept sizes other than the training size; the WRN-x-10 nets are the costliest, hence 16x16.
INPUT_SIZE = {"ResNet50": 64, "small_cnn": 8, "wrn_28_10": 16, "wrn_34_10": 16}
NUM_CLASSES = {"ResNet50": 1000}
BATCH = 2


def _prunable(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _inputs(name: str, in_channels: int = 3, batch: int = BATCH) -> torch.Tensor:
    size = INPUT_SIZE.get(name, 32)
    return torch.rand(batch, in_channels, size, size)


# ---------------------------------------------------------------------------------------------- registry


def test_registered_names():
    assert list_models() == sorted(["vgg16_bn", "resnet18", "wrn_28_4", "wrn_28_10", "wrn_34_10", "ResNet50",
                                    "small_cnn", "cifar_model", "cifar_model_large"])
    assert MODELS.kind == "architecture"


def test_unknown_name_lists_choices():
    with pytest.raises(UserError) as info:
        create_model("vgg17", num_classes=10)
    message = str(info.value)
    assert "vgg17" in message
    for name in list_models():
        assert name in message


def test_library_does_not_print(capsys):
    create_model("small_cnn", num_classes=10, normalize=True, mean=[0.5] * 3, std=[0.25] * 3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ------------------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    num_classes = NUM_CLASSES.get(name, 10)
    model = create_model(name, num_classes=num_classes)
    model.train()
    out = model(_inputs(name))
    assert out.shape == (BATCH, num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(BATCH) % num_classes).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", ["small_cnn", "vgg16_bn", "resnet18", "wrn_28_4"])
def test_single_channel_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1).eval()
    first_conv = _prunable(model)[0][1]
    assert first_conv.in_channels == 1
    with torch.no_grad():
        out = model(_inputs(name, in_channels=1))
    assert out.shape == (BATCH, 7) and torch.isfinite(out).all()


def test_small_cnn_mnist_size_and_width():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    out = model(torch.rand(BATCH, 1, 28, 28))
    assert out.shape == (BATCH, 10)
    narrow = MODELS.get("small_cnn")(num_classes=10, in_channels=1, width=0.25)
    widths = [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64]
    assert narrow(torch.rand(BATCH, 1, 8, 8)).shape == (BATCH, 10)


# ---------------------------------------------------------------------------- benchmark layouts (§B.8)

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn_entries(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (channels,)) for s in _BN_SUFFIXES}


def _expected_vgg16_bn() -> dict:
    # Rows of the §B.8 table: conv index in `features`, weight shape; the BN sits at index + 1.
    convs = [
        (0, (64, 3, 3, 3)), (3, (64, 64, 3, 3)),
        (7, (128, 64, 3, 3)), (10, (128, 128, 3, 3)),
        (14, (256, 128, 3, 3)), (17, (256, 256, 3, 3)), (20, (256, 256, 3, 3)),
        (24, (512, 256, 3, 3)), (27, (512, 512, 3, 3)), (30, (512, 512, 3, 3)),
        (34, (512, 512, 3, 3)), (37, (512, 512, 3, 3)), (40, (512, 512, 3, 3)),
    ]
    expected = {}
    for index, shape in convs:
        expected[f"features.{index}.weight"] = shape
        expected.update(_bn_entries(f"features.{index + 1}", shape[0]))
    expected.update({
        "classifier.0.weight": (256, 2048), "classifier.0.bias": (256,),
        "classifier.2.weight": (256, 256), "classifier.2.bias": (256,),
        "classifier.4.weight": (10, 256), "classifier.4.bias": (10,),
    })
    return expected


def _expected_resnet18() -> dict:
    expected = {"conv1.weight": (64, 3, 3, 3)}
    expected.update(_bn_entries("bn1", 64))
    in_planes = 64
    for stage, planes in enumerate([64, 128, 256, 512], start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            block_in = in_planes if block == 0 else planes
            expected[f"{prefix}.conv1.weight"] = (planes, block_in, 3, 3)
            expected.update(_bn_entries(f"{prefix}.bn1", planes))
            expected[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            expected.update(_bn_entries(f"{prefix}.bn2", planes))
            if block_in != planes:
                expected[f"{prefix}.shortcut.0.weight"] = (planes, block_in, 1, 1)
                expected.update(_bn_entries(f"{prefix}.shortcut.1", planes))
        in_planes = planes
    expected.update({"linear.weight": (10, 512), "linear.bias": (10,)})
    return expected


@pytest.mark.parametrize("name, expected_fn, n_entries", [
    ("vgg16_bn", _expected_vgg16_bn, 84),
    ("resnet18", _expected_resnet18, 122),
])
def test_benchmark_state_dict_layout(name, expected_fn, n_entries):
    expected = expected_fn()
    assert len(expected) == n_entries
    state = create_model(name, num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_resnet18_prunable_order_matches_strategy_vectors():
    # HARP's 21-entry resnet18 strategies list layers in module-registration order, shortcut after conv2.
    names = [n for n, _ in _prunable(create_model("resnet18", num_classes=10))]
    expected = ["conv1"]
    for stage in range(1, 5):
        for block in range(2):
            expected += [f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.conv2"]
            if stage > 1 and block == 0:
                expected.append(f"layer{stage}.0.shortcut.0")
    expected.append("linear")
    assert names == expected


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet18", "small_cnn"])
def test_strict_load_between_instances(name):
    torch.manual_seed(0)
    source = create_model(name, num_classes=10)
    torch.manual_seed(1)
    target = create_model(name, num_classes=10)
    target.load_state_dict(source.state_dict(), strict=True)
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


@pytest.mark.parametrize("name, num_classes, n_layers, n_weights", [
    ("vgg16_bn", 10, 16, 15_302_848),
    ("resnet18", 10, 21, 11_164_352),
    ("wrn_28_4", 10, 29, 5_841_840),
    ("ResNet50", 1000, 54, 25_502_912),
])
def test_prunable_counts(name, num_classes, n_layers, n_weights):
    layers = _prunable(create_model(name, num_classes=num_classes))
    assert len(layers) == n_layers
    assert sum(m.weight.numel() for _, m in layers) == n_weights
    convs = [m for _, m in layers if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    assert all(isinstance(m, nn.Linear) and m.bias is not None for _, m in layers if m not in convs)


def test_wrn_module_names():
    model = create_model("wrn_28_4", num_classes=10)
    names = dict(model.named_modules())
    for expected in ["conv1", "block1.layer.0.bn1", "block1.layer.0.relu1", "block1.layer.0.conv1",
                     "block1.layer.0.bn2", "block1.layer.0.relu2", "block1.layer.0.conv2",
                     "block1.layer.0.convShortcut", "block2.layer.0.convShortcut", "block3.layer.3.conv2",
                     "bn1", "relu", "fc"]:
        assert expected in names, expected
    # Blocks with equal widths have no shortcut module at all (and so no key in the state dict).
    assert "block1.layer.1.convShortcut" not in names
    assert names["block2.layer.0.convShortcut"].weight.shape == (128, 64, 1, 1)
    assert names["block2.layer.0.convShortcut"].stride == (2, 2)
    assert names["fc"].weight.shape == (10, 256)


def test_resnet50_module_names():
    model = create_model("ResNet50", num_classes=1000)
    names = dict(model.named_modules())
    for expected in ["conv1", "bn1", "relu", "maxpool", "layer1.0.downsample.0", "layer1.0.downsample.1",
                     "layer4.2.conv3", "layer4.2.bn3", "avgpool", "fc"]:
        assert expected in names, expected
    assert names["layer1.0.downsample.0"].weight.shape == (256, 64, 1, 1)
    # v1.5: the stride sits in the 3x3 conv, not in the first 1x1.
    assert names["layer2.0.conv2"].stride == (2, 2) and names["layer2.0.conv1"].stride == (1, 1)
    assert "layer1.1.downsample" not in names


# ------------------------------------------------------------------------------------------------ init


def test_vgg_init():
    torch.manual_seed(0)
    model = create_model("vgg16_bn", num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
            assert abs(m.weight.std().item() - 0.01) < 0.002
    conv = model.features[40]
    expected_std = math.sqrt(2.0 / (3 * 3 * 512))  # Kaiming, fan_out
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05


@pytest.mark.parametrize("init_type", ["kaiming_uniform", "signed_const"])
def test_vgg_init_variants(init_type):
    torch.manual_seed(0)
    model = create_model("vgg16_bn", num_classes=10, init_type=init_type)
    conv = model.features[3]
    if init_type == "signed_const":
        magnitude = math.sqrt(2.0 / (3 * 3 * 64))
        assert torch.allclose(conv.weight.abs(), torch.full_like(conv.weight, magnitude))
    else:
        bound = math.sqrt(6.0 / (3 * 3 * 64))  # Kaiming-uniform, fan_out = 64 * 3 * 3
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.abs().max().item() > 0.9 * bound


@pytest.mark.parametrize("name", ["resnet18", "wrn_28_4", "ResNet50", "small_cnn", "wrn_28_10", "wrn_34_10"])
def test_other_init_types_rejected(name):
    with pytest.raises(UserError, match=name):
        create_model(name, num_classes=10, init_type="signed_const")


def test_vgg_unknown_init_rejected():
    with pytest.raises(UserError, match="kaiming_uniform"):
        create_model("vgg16_bn", num_classes=10, init_type="xavier")


# ---------------------------------------------------------------------------------------- normalisation

MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2471, 0.2435, 0.2616]


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "vgg16_bn"])
def test_normalize_matches_manual(name):
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10).eval()
    normed = create_model(name, num_classes=10, normalize=True, mean=MEAN, std=STD).eval()
    assert isinstance(normed.normalize, InputNormalize) and isinstance(plain.normalize, nn.Identity)
    assert normed.state_dict().keys() == plain.state_dict().keys()
    normed.load_state_dict(plain.state_dict(), strict=True)
    x = _inputs(name)
    manual = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain(manual))


def test_normalize_buffers_follow_to():
    model = create_model("small_cnn", num_classes=10, normalize=True, mean=MEAN, std=STD)
    buffers = dict(model.named_buffers())
    assert "normalize.mean" in buffers and "normalize.std" in buffers
    assert buffers["normalize.mean"].shape == (1, 3, 1, 1)
    assert not any(k.startswith("normalize") for k in model.state_dict())
    model.to(torch.float64)
    assert model.normalize.mean.dtype == torch.float64 and model.normalize.std.dtype == torch.float64
    model.to("meta")
    assert model.normalize.mean.device.type == "meta" and model.normalize.std.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normalize_on_gpu():
    model = create_model("resnet18", num_classes=10, normalize=True, mean=MEAN, std=STD).cuda().eval()
    assert model.normalize.mean.is_cuda
    with torch.no_grad():
        assert model(torch.rand(BATCH, 3, 32, 32, device="cuda")).shape == (BATCH, 10)


@pytest.mark.parametrize("kwargs", [
    {"mean": None, "std": STD},
    {"mean": MEAN, "std": None},
    {"mean": None, "std": None},
    {"mean": MEAN[:2], "std": STD[:2]},
    {"mean": MEAN, "std": [0.2, 0.0, 0.2]},
])
def test_normalize_bad_statistics(kwargs):
    with pytest.raises(UserError):
        create_model("small_cnn", num_classes=10, normalize=True, **kwargs)


def test_normalize_single_channel():
    model = create_model("small_cnn", num_classes=10, in_channels=1, normalize=True, mean=[0.1307], std=[0.3081])
    assert model(torch.rand(BATCH, 1, 28, 28)).shape == (BATCH, 10)


# -------------------------------------------------------------------- residual ties by tensor identity


def _capture_inputs(model: nn.Module, module_names):
    captured = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args[0]))
               for n in module_names]
    return captured, handles


@pytest.mark.parametrize("name, pairs, size", [
    ("resnet18", [("layer2.0.conv1", "layer2.0.shortcut.0"), ("layer4.0.conv1", "layer4.0.shortcut.0")], 32),
    ("wrn_28_4", [("block1.layer.0.conv1", "block1.layer.0.convShortcut"),
                  ("block2.layer.0.conv1", "block2.layer.0.convShortcut")], 32),
    ("ResNet50", [("layer1.0.conv1", "layer1.0.downsample.0"), ("layer3.0.conv1", "layer3.0.downsample.0")], 32),
])
def test_shortcut_shares_input_object(name, pairs, size):
    model = create_model(name, num_classes=10).eval()
    captured, handles = _capture_inputs(model, [n for pair in pairs for n in pair])
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()
    for conv1, shortcut in pairs:
        assert captured[conv1] is captured[shortcut], f"{name}: {conv1} and {shortcut} see different tensors"
