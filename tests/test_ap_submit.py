"""scripts/ap_submit.py: the AP benchmark's model key, a dense checkpoint for its base models, distances, paste text.

The benchmark's base ResNet18 and VGG16-BN are built here from the layer names and shapes of
the benchmark's published layer names alone (not from models/), and the kit's checkpoint must load into them with
strict=True and give the same logits as the model test.py evaluates.
"""
import dataclasses
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import Config, config_to_dict
from data.info import dataset_info
from scripts import ap_submit
from pruning.init import set_keep_rates
from pruning.wrap import masked_layers, model_sparsity
from stage import build_evaluated_model, build_model
from trainers.evaluation.ap_protocol import AP_PRESET
from trainers.evaluation.minimum_norm import FMNOptions, ap_fmn_plan, write_distances
from trainers.evaluation.report import RESULT_FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ §B.8, independently
class BaseVGG16(nn.Module):
    """base_vgg16.vgg16_bn(): features 0-42 (conv 3x3 no bias, BN, ReLU; pools at 6, 13, 23, 33), 2x2 average
    pool, classifier Linear(2048, 256), ReLU, Linear(256, 256), ReLU, Linear(256, 10)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512):
            if width == "pool":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                        nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class BaseResNet18(nn.Module):
    """base_resnet18.resnet18(): conv1 3x3 stride 1, bn1, relu, layer1-4 of two blocks (shortcut 1x1 conv + BN
    where the shape changes), avg_pool2d(4), linear(512, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.avg_pool2d(out, 4), 1))


BASES = {"vgg16_bn": (BaseVGG16, 84), "resnet18": (BaseResNet18, 122)}  # state-dict entries per §B.8


def test_base_models_match_the_reference_counts():
    for make, entries in BASES.values():
        assert len(make().state_dict()) == entries
    weights = sum(m.weight.numel() for m in BaseVGG16().modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights == 15_302_848


# ------------------------------------------------------------------------------------------ fixtures
def _pruned_checkpoint(folder, arch, prune_reg, k, rate=None, **overrides):
    """A masked (HARP-finetuned) checkpoint of our format with random scores and BN statistics, every layer's keep
    rate at `rate` (default k)."""
    cfg = dataclasses.replace(Config(), dataset="CIFAR10", arch=arch, exp_mode="harp_finetune", prune_reg=prune_reg,
                              k=k, num_classes=10, **overrides)
    torch.manual_seed(1)
    model = build_model(cfg, dataset_info("CIFAR10"), torch.device("cpu"), masked=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("popup_scores") or name.endswith("running_mean"):
                tensor.copy_(torch.randn_like(tensor))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand_like(tensor))
    set_keep_rates(model, {name: rate or k for name, _ in masked_layers(model)})
    run = os.path.join(str(folder), arch, "run")
    path = os.path.join(run, "checkpoint", "model_best.pth.tar")
    os.makedirs(os.path.dirname(path))
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return path, cfg


def _ap_result(checkpoint, distances, hofmn=0.25, budget=None, deviations=()):
    """What test.py --attack-preset ap writes for this checkpoint: the result JSON (with the evaluated model's
    measured sparsity; `hofmn`: the HO-FMN fraction it states) and its distances file."""
    ckpt = torch.load(checkpoint, weights_only=True)
    cfg = dataclasses.replace(Config(), **ckpt["config"])
    sparsity = model_sparsity(build_evaluated_model(cfg, dataset_info("CIFAR10"), ckpt, checkpoint,
                                                    torch.device("cpu")))
    folder = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "eval")
    stem = os.path.join(folder, f"model_best_{AP_PRESET}")
    os.makedirs(folder)
    n = len(distances)
    plan = ap_fmn_plan(FMNOptions(), 2048 + n)
    name = write_distances(stem, torch.tensor(distances, dtype=torch.float64), torch.tensor(distances) > 0,
                           torch.zeros(n, dtype=torch.long), torch.arange(2048, 2048 + n), plan)
    result = {"format_version": RESULT_FORMAT_VERSION, "arch": "vgg16_bn", "dataset": "CIFAR10",
              "exp_mode": "harp_finetune", "natural_acc": 80.7,
              "sparsity": {k: v for k, v in sparsity.items() if k != "per_layer"}, "budget": budget,
              "preset": AP_PRESET, "checkpoint": checkpoint,
              "attacks": {"fmn": {"distances_file": name}, "autoattack": {}},
              "protocol": {"numbers": {"clean_accuracy": 80.7, "robust_accuracy_aa": 42.83,
                                       "robust_accuracy_hofmn": hofmn}, "deviations": list(deviations)}}
    with open(f"{stem}.json", "w") as fh:
        json.dump(result, fh)
    return f"{stem}.json"


# ------------------------------------------------------------------------------------------ the kit
@pytest.mark.parametrize("arch,prune_reg,k,key", [
    ("vgg16_bn", "weight", 0.01, "HARP_Zhao2023Holistic_V16_CIFAR10_US_99"),
    ("resnet18", "channel", 0.5, "HARP_Zhao2023Holistic_R18_CIFAR10_S_50"),
])
def test_kit_writes_a_checkpoint_the_base_model_loads_with_the_evaluated_logits(tmp_path, capsys, arch, prune_reg, k,
                                                                                 key):
    checkpoint, cfg = _pruned_checkpoint(tmp_path, arch, prune_reg, k)
    _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")])
    out = str(tmp_path / "submission")
    assert ap_submit.main([checkpoint, "--ap-method", "HARP_Zhao2023Holistic", "--output", out]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == key

    state = torch.load(os.path.join(out, f"{key}.pt"), weights_only=True)["state_dict"]
    base = BASES[arch][0]().eval()
    base.load_state_dict(state, strict=True)
    ckpt = torch.load(checkpoint, weights_only=True)
    evaluated = build_evaluated_model(cfg, dataset_info("CIFAR10"), ckpt, checkpoint, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(base(x), evaluated(x), rtol=1e-5, atol=1e-6)
    zeros = sum(int((v == 0).sum()) for n, v in state.items() if n.endswith("weight") and v.dim() > 1)
    assert zeros > 0  # the masks are in the weights

    with open(os.path.join(out, f"{key}.pickle"), "rb") as fh:
        distances = pickle.load(fh)
    assert [d.dtype for d in distances] == [torch.float32] * 4 and all(d.dim() == 0 for d in distances)
    assert [float(d) for d in distances] == pytest.approx([0.0, 0.021, 0.05, 0.0])  # the failure counts as 0

    with open(os.path.join(out, f"{key}.txt")) as fh:
        text = fh.read()
    assert f'_Model GDrive:_ "{key}" : ["your_gdrive_link_id", ".pt"]' in text
    assert f'_Distances GDrive:_ "{key}" : ["your_gdrive_link_id", ".pickle"]' in text
    assert "_Clean Accuracy:_ 80.70" in text and "_Robust Accuracy (AA):_ 42.83" in text
    assert "_Robust Accuracy (HO-FMN):_ 0.25" in text and text in printed


def test_model_key_and_sparsity_rules():
    assert ap_submit.model_key("HYDRA_Sehwag2020Hydra", "resnet18", "SVHN", "weight", "90") == \
        "HYDRA_Sehwag2020Hydra_R18_SVHN_US_90"
    assert ap_submit.sparsity_label(0.05, None, 95.0) == "95" and ap_submit.sparsity_label(None, "75", 80.0) == "75"
    for bad in (("HARP", "vgg16_bn", "CIFAR10", "weight", "99"), ("HARP_Zhao_2023", "vgg16_bn", "CIFAR10", "weight",
                                                                  "99"),
                ("HARP_Zhao2023Holistic", "small_cnn", "CIFAR10", "weight", "99"),
                ("HARP_Zhao2023Holistic", "vgg16_bn", "CIFAR100", "weight", "99"),
                ("HARP_Zhao2023Holistic", "vgg16_bn", "CIFAR10", "channel", "99")):
        with pytest.raises(ap_submit.UserError):
            ap_submit.model_key(*bad)
    with pytest.raises(ap_submit.UserError, match="--sparsity"):
        ap_submit.sparsity_label(None, None, 0.0)
    with pytest.raises(ap_submit.UserError, match="--sparsity"):
        ap_submit.sparsity_label(0.123, None, 87.7)


def test_kit_refuses_what_the_benchmark_cannot_take(tmp_path, capsys):
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "weight", 0.01)
    assert ap_submit.main([checkpoint, "--ap-method", "HARP_Zhao2023Holistic"]) == 2
    err = capsys.readouterr().err
    assert "--attack-preset ap" in err and checkpoint in err  # no AP evaluation yet: the command to run
    normalised, _ = _pruned_checkpoint(tmp_path / "n", "vgg16_bn", "weight", 0.01, normalize=True)
    assert ap_submit.main([normalised, "--ap-method", "HARP_Zhao2023Holistic"]) == 2
    assert "normalises its inputs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ what it refuses to hand out
def _refused(capsys, argv, out):
    """The kit exits 2 with one error line and writes nothing; returns that line."""
    assert ap_submit.main(argv + ["--output", out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ap_submit.py: error: ") and not os.path.exists(out)
    return lines[0]


def test_the_key_level_is_the_measured_sparsity_not_the_nominal_k(tmp_path, capsys):
    # HARP's channel k 0.25 is a FLOPs target: the rates it learns keep fewer weights than a quarter
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "channel", 0.25, rate=0.12)
    _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")])
    measured = 100 * (1 - model_sparsity(ap_submit.evaluated_model(checkpoint)[0])["global_keep"])
    assert measured > 80
    out = str(tmp_path / "submission")
    error = _refused(capsys, [checkpoint, "--ap-method", "HARP_Zhao2023Holistic"], out)
    assert f"{measured:.2f} % sparse" in error and "75 %" in error and "--sparsity" in error
    assert ap_submit.main([checkpoint, "--ap-method", "HARP_Zhao2023Holistic", "--output", out,
                           "--sparsity", "75"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith("_S_75") and f"{measured:.2f} % sparse" in captured.err


def test_kit_refuses_a_result_older_than_its_checkpoint(tmp_path, capsys):
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "weight", 0.01)
    result = _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")])
    written = os.path.getmtime(checkpoint)
    os.utime(result, (written - 60, written - 60))  # evaluated before the checkpoint was last written
    error = _refused(capsys, [checkpoint, "--ap-method", "HARP_Zhao2023Holistic"], str(tmp_path / "submission"))
    assert "is older than" in error and "--attack-preset ap" in error


def test_kit_refuses_a_hofmn_fraction_its_distances_do_not_give(tmp_path, capsys):
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "weight", 0.01)
    # counted as HO-FMN does: the clean error and the failure are 0, only 0.05 lies above 8/255: 1 of 4
    _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")], hofmn=0.4453125)
    error = _refused(capsys, [checkpoint, "--ap-method", "HARP_Zhao2023Holistic"], str(tmp_path / "submission"))
    assert "0.4453125 does not match its distances (1 of 4 above 8/255: 0.25)" in error


def test_kit_refuses_a_model_off_its_budget_target(tmp_path, capsys):
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "weight", 0.01)
    budget = {"measure": "keep", "target": 0.01, "reached": 0.002532, "on_target": False}
    _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")], budget=budget)
    error = _refused(capsys, [checkpoint, "--ap-method", "HARP_Zhao2023Holistic"], str(tmp_path / "submission"))
    assert "kept 0.2532 %" in error and "target 1 %" in error and "--target-floor" in error


def test_a_deviating_evaluation_is_written_only_when_allowed_and_its_key_says_so(tmp_path, capsys):
    checkpoint, _ = _pruned_checkpoint(tmp_path, "vgg16_bn", "weight", 0.01)
    deviation = "--n-examples 500: the protocol evaluates the first 10000 test points"
    _ap_result(checkpoint, [0.0, 0.021, 0.05, float("inf")], deviations=[deviation])
    out = str(tmp_path / "submission")
    error = _refused(capsys, [checkpoint, "--ap-method", "HARP_Zhao2023Holistic"], out)
    assert deviation in error and "--allow-deviations" in error
    assert ap_submit.main([checkpoint, "--ap-method", "HARP_Zhao2023Holistic", "--output", out,
                           "--allow-deviations"]) == 0
    key = capsys.readouterr().out.splitlines()[0]
    assert key == "HARP_Zhao2023Holistic_V16_CIFAR10_US_99" + ap_submit.DEVIATING_SUFFIX
    with open(os.path.join(out, f"{key}.txt")) as fh:
        assert deviation in fh.read()
