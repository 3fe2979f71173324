"""Physically compact exports: channel-pruned models rebuilt without their pruned channels (same logits, fewer
MACs, TorchScript that loads without the toolkit) and sparse files of weight-pruned state dicts."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from models import create_model
from pruning.compact import compact_model, count_macs, load_sparse_checkpoint, save_compact, save_sparse_checkpoint
from pruning.graph import inspect_layers
from pruning.init import init_scores_random, set_keep_rates, tie_rates
from pruning.layers import MaskedMixin
from pruning.wrap import dense_state_dict, freeze_masks, masked_layers, sparsify

K = 0.5
CIFAR = (3, 32, 32)


def _randomize_batch_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms (non-zero biases make dropped channels' constants matter), and
    linear layers at PyTorch's default init (VGG's N(0, 0.01) head gives logits too small to compare)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def _channel_pruned(model: nn.Module, example: torch.Tensor, keep: float = K, freeze: bool = True) -> nn.Module:
    """Channel masks as train.py sets them up: k_min = 0.1 k, rates of layers sharing an input tied."""
    sparsify(model, "channel", keep_min=0.1 * keep)
    tie_rates(model, inspect_layers(model, example).tie_groups)
    init_scores_random(model, "kaiming_normal")
    set_keep_rates(model, {name: keep for name, _ in masked_layers(model)})
    if freeze:
        freeze_masks(model)
    return model.eval()


def _assert_same_logits(model: nn.Module, compact: nn.Module, x: torch.Tensor) -> None:
    """Max abs logit difference below 1e-5 (fp32, eval mode), on logits large enough for that to mean something."""
    with torch.no_grad():
        expected = model(x)
        gap, scale = float((expected - compact(x)).abs().max()), float(expected.abs().max())
    assert scale > 0.01 and gap < 1e-5, (gap, scale)


def _assert_plain_and_independent(model: nn.Module, compact: nn.Module) -> None:
    assert not any(isinstance(m, MaskedMixin) for m in compact.modules())
    original = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not original & {t.data_ptr() for t in list(compact.parameters()) + list(compact.buffers())}


@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
def test_benchmark_models_compact_to_the_same_logits_with_fewer_macs(arch, one_thread):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    _randomize_batch_norms(model)
    x = torch.rand(4, *CIFAR)
    _channel_pruned(model, x[:1])
    compact = compact_model(model, x[:1])

    _assert_same_logits(model, compact, x)
    dense_macs, compact_macs = count_macs(model, x[:1]), count_macs(compact, x[:1])
    assert compact_macs < 0.6 * dense_macs  # k = 0.5 keeps about half of every conv's input channels
    _assert_plain_and_independent(model, compact)
    convs = [m for m in compact.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs[0].in_channels == 3  # the caller's image keeps its channels, even those the stem ignores
    assert sum(m.in_channels for m in convs) < 0.8 * sum(m.weight.shape[1] for m in model.modules()
                                                          if isinstance(m, nn.Conv2d))
    assert not compact.training


def test_masks_need_not_be_frozen_and_the_model_is_left_as_it_was(one_thread):
    torch.manual_seed(1)
    model = create_model("small_cnn", num_classes=10, normalize=True, mean=[0.4] * 3, std=[0.2] * 3)
    _randomize_batch_norms(model)
    x = torch.rand(3, 3, 16, 16)
    _channel_pruned(model, x[:1], freeze=False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    compact = compact_model(model, x[:1])

    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    _assert_same_logits(model, compact, x)
    _assert_plain_and_independent(model, compact)


def test_sync_batch_norm_of_multi_gpu_runs_becomes_plain_batch_norm(one_thread):
    torch.manual_seed(8)
    model = create_model("small_cnn", num_classes=10)
    _randomize_batch_norms(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    x = torch.rand(2, 3, 16, 16)
    _channel_pruned(model, x[:1])

    compact = compact_model(model, x[:1])

    norms = [type(m) for m in compact.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == [nn.BatchNorm2d] * 3
    assert compact.get_submodule("features.1").num_features < 64
    _assert_same_logits(model, compact, x)


class _ResidualNet(nn.Module):
    """Stem, one block with a projection shortcut, global pool and a linear head (4 channels throughout)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + self.shortcut(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _set_channel_scores(model: nn.Module, kept: dict) -> None:
    """Make each named layer keep exactly the given input channels (the largest scores win)."""
    layers = dict(masked_layers(model))
    with torch.no_grad():
        for name, channels in kept.items():
            scores = torch.full((layers[name].popup_scores.numel(),), 0.1)
            scores[list(channels)] = 1.0
            layers[name].popup_scores.copy_(scores.view_as(layers[name].popup_scores))


def test_a_channel_the_shortcut_keeps_survives_where_the_conv_drops_it(one_thread):
    torch.manual_seed(2)
    model = _ResidualNet()
    _randomize_batch_norms(model)
    x = torch.rand(2, 3, 8, 8)
    sparsify(model, "channel", keep_min=0.05)
    tie_rates(model, inspect_layers(model, x[:1]).tie_groups)
    set_keep_rates(model, {name: K for name, _ in masked_layers(model)})  # 2 of 4 channels, 2 of 3 for the stem
    _set_channel_scores(model, {"stem": [0, 1], "conv1": [1, 2], "conv2": [0, 3], "shortcut.0": [0, 1],
                                "head": [0, 1]})
    freeze_masks(model)
    model.eval()

    compact = compact_model(model, x[:1])

    # The stem's output is read by conv1 (channels 1, 2) and the shortcut (0, 1): channel 0 must stay for the
    # shortcut although conv1 ignores it, and conv1 keeps a zero column for it.
    shortcut = compact.get_submodule("shortcut.0")
    assert compact.stem.out_channels == 3 and compact.bn0.num_features == 3
    assert compact.conv1.in_channels == 3 and shortcut.in_channels == 3
    assert torch.equal(compact.conv1.weight[:, 0], torch.zeros_like(compact.conv1.weight[:, 0]))
    # The residual sum is read by the head only (channels 0, 1): both addends drop channels 2 and 3.
    assert compact.conv2.out_channels == 2 and shortcut.out_channels == 2 and compact.head.in_features == 2
    assert compact.conv2.in_channels == 2 and compact.conv1.out_channels == 2  # conv2 reads channels 0, 3 only
    _assert_same_logits(model, compact, x)


def test_a_filter_of_zeros_still_feeds_its_batch_norm_bias_forward(one_thread):
    # conv1's filter 0 is all zero, so BN turns channel 0 into the constant relu(bias) that conv2 reads:
    # it must not be removed just because its weights are zero.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 36, 2))
    _randomize_batch_norms(model)
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[1].bias[0] = 1.0
    sparsify(model, "channel", keep_min=0.05)
    set_keep_rates(model, {name: 1.0 for name, _ in masked_layers(model)})
    model.eval()
    x = torch.rand(2, 3, 6, 6)

    compact = compact_model(model, x[:1])

    assert compact.get_submodule("3").in_channels == 4 and compact.get_submodule("0").out_channels == 4
    _assert_same_logits(model, compact, x)


class _ConcatNet(nn.Module):
    """A channel concatenation the analysis does not slice through, and a flatten by view(size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = self.b(torch.cat([h, h * 2], dim=1))
        return self.fc(h.view(h.size(0), -1))


def test_unlisted_operations_keep_every_channel_and_stay_exact(one_thread):
    torch.manual_seed(4)
    model = _ConcatNet()
    x = torch.rand(2, 3, 4, 4)
    _channel_pruned(model, x[:1], freeze=False)
    _set_channel_scores(model, {"fc": range(3 * 16)})  # the head reads the first three channels of b only

    compact = compact_model(model, x[:1])

    assert compact.a.out_channels == 4 and compact.b.in_channels == 8  # cat's inputs and output stay whole
    assert compact.b.out_channels == 3 and compact.fc.in_features == 3 * 16  # the flatten maps blocks of 16
    _assert_same_logits(model, compact, x)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def test_models_it_cannot_compact_raise_one_line_user_errors():
    x = torch.rand(1, 3, 8, 8)
    untraceable = _DataDependent()
    sparsify(untraceable, "channel", keep_min=0.05)
    with pytest.raises(UserError, match="cannot trace") as err:
        compact_model(untraceable, x)
    assert "\n" not in str(err.value)

    weight_pruned = _DataDependent()
    sparsify(weight_pruned, "weight", keep_min=0.05)
    with pytest.raises(UserError, match="weight-granular"):
        compact_model(weight_pruned, x)


# (save_compact's switch, file name, how a plain torch loads it): torch.export by default, TorchScript when asked
FORMATS = {"torch.export": (False, "model_compact.pt2", "torch.export.load(sys.argv[1]).module()"),
           "torchscript": (True, "model_compact.pt", "torch.jit.load(sys.argv[1])")}


@pytest.mark.parametrize("file_format", FORMATS)
def test_compact_file_runs_without_the_toolkit(tmp_path, one_thread, file_format):
    torchscript, name, load = FORMATS[file_format]
    torch.manual_seed(5)
    model = create_model("small_cnn", num_classes=10)
    _randomize_batch_norms(model)
    x = torch.rand(3, 3, 16, 16)
    _channel_pruned(model, x[:1])
    compact = compact_model(model, x[:1])
    with pytest.raises(UserError, match="compact_model first"):
        save_compact(model, x[:1], str(tmp_path / "masked.pt"))

    path = tmp_path / "out" / name
    save_compact(compact, x[:1], str(path), torchscript=torchscript)
    torch.save({"x": x, "logits": model(x).detach()}, tmp_path / "io.pt")

    # -I: isolated interpreter (no project directory on sys.path, no PYTHON* variables), run elsewhere
    script = (f"import sys, torch; io = torch.load('io.pt'); m = {load}; "
              "print(float((m(io['x']) - io['logits']).abs().max()))")
    done = subprocess.run([sys.executable, "-I", "-c", script, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]


def test_sparse_checkpoint_round_trips_bit_for_bit(tmp_path):
    torch.manual_seed(6)
    big = torch.randn(300, 257)
    big[torch.rand_like(big) < 0.97] = 0.0
    big[0, 0] = -0.0  # masked weights hold negative zeros (W * 0 for W < 0); they come back as zeros
    lonely = torch.zeros(70_000)
    lonely[[3, 69_999]] = torch.tensor([1.5, -2.0])  # a gap too wide for int16
    state = {"big": big, "lonely": lonely, "half": torch.where(torch.rand(64, 64) < 0.9, 0.0, 1.0).half(),
             "dense": torch.randn(5, 5), "zeros": torch.zeros(40, 40), "count": torch.tensor(7),
             "flags": torch.rand(9) < 0.5, "empty": torch.empty(0, 3), "view": torch.randn(50, 50)[:, :3]}

    save_sparse_checkpoint(state, str(tmp_path / "s.pth.tar"))
    loaded = load_sparse_checkpoint(str(tmp_path / "s.pth.tar"))

    assert list(loaded) == list(state)
    for key, value in state.items():
        got = loaded[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got, value), key
    assert torch.equal(loaded["half"].reshape(-1).view(torch.uint8), state["half"].reshape(-1).view(torch.uint8))


def test_sparse_checkpoint_of_vgg16_bn_at_99_percent_is_under_3_percent_of_the_dense_file(tmp_path):
    torch.manual_seed(7)
    model = create_model("vgg16_bn", num_classes=10)
    sparsify(model, "weight", keep_min=0.001)
    set_keep_rates(model, {name: 0.01 for name, _ in masked_layers(model)})
    dense = dense_state_dict(model)
    dense_path, sparse_path = tmp_path / "dense.pth.tar", tmp_path / "sparse.pth.tar"
    torch.save(dense, dense_path)

    save_sparse_checkpoint(dense, str(sparse_path))

    assert os.path.getsize(sparse_path) <= 0.03 * os.path.getsize(dense_path)
    raw = torch.load(sparse_path, weights_only=True)  # plain torch reads the file safely
    assert set(raw["tensors"]) == set(dense)
    loaded = load_sparse_checkpoint(str(sparse_path))
    assert all(torch.equal(loaded[k], v) for k, v in dense.items())
    plain = create_model("vgg16_bn", num_classes=10)
    plain.load_state_dict(loaded, strict=True)


def test_a_foreign_file_is_not_read_as_a_sparse_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth.tar")
    with pytest.raises(UserError, match="not a sparse checkpoint"):
        load_sparse_checkpoint(str(tmp_path / "other.pth.tar"))
