"""IBP, symbolic-interval and CROWN-IBP bounds (trainers/certify/bounds.py) and Hydra's verifiable CNNs
(models/hydra_cnn.py).

Checks against independent references: brute-force interval arithmetic over the corners of input and
hidden boxes, a neuron-by-neuron symbolic interval analysis in plain Python, exact linear bounds where the
network is linear on the box (autograd gradient), sampled points of the eps-ball, PGD, and plain models with
the masked weights zeroed.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import UserError
from models import MODELS, create_model, list_models
from pruning.wrap import freeze_masks, masked_layers, sparsify
from trainers.attacks.pgd import pgd
from trainers.attacks.threat import ThreatModel
from trainers.certify.bounds import (CROWN_IBP, IBP, SYMBOLIC, SYMBOLIC_CHUNK, crown_ibp_loss, crown_ibp_schedule,
                                     input_box, interval_bounds, margin_lower_bounds, verification_sums, verified,
                                     verified_accuracy, worst_case_loss)

pytestmark = pytest.mark.usefixtures("one_thread")
SLACK = 1e-5


def tiny_conv(seed=0, num_classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, num_classes))


def quadrant_data(n, seed):
    """6x6 images labelled by their brightest quadrant (4 classes): learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    quadrants = torch.stack([x[:, 0, r:r + 3, c:c + 3].mean(dim=(1, 2)) for r in (0, 3) for c in (0, 3)], dim=1)
    return x, quadrants.argmax(dim=1)


def two_input_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))


def sample_ball(x, eps, count, clip_min=0.0, clip_max=1.0):
    """`count` points per input, uniform in the eps-ball intersected with [clip_min, clip_max], corners included."""
    lower, upper = input_box(x, eps, clip_min, clip_max)
    u = torch.rand(count, *x.shape)
    u[: count // 4] = u[: count // 4].round()  # box corners, where the extremes of linear pieces lie
    return lower + u * (upper - lower)


def model_margins(model, x, y):
    logits = model(x)
    return logits.gather(1, y[:, None]) - logits


def unstable_relus(model, x, eps, clip_min=0.0, clip_max=1.0):
    """Number of ReLUs whose IBP pre-activation interval straddles 0."""
    count = 0
    for i, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            lower, upper = interval_bounds(model[:i], x, eps, clip_min, clip_max)
            count += int(((lower < 0) & (upper > 0)).sum())
    return count


# ----------------------------------------------------------------------------- IBP
@pytest.mark.parametrize("x", [[0.4, 0.6], [0.05, 0.9]])  # the second box is clipped at 0 and 1
def test_ibp_equals_brute_force_interval_arithmetic(x):
    model = two_input_net()
    x, eps = torch.tensor([x]), 0.2
    lower_in, upper_in = input_box(x, eps)
    corners = torch.tensor(list(itertools.product(*zip(lower_in[0].tolist(), upper_in[0].tolist()))))
    with torch.no_grad():
        pre = model[0](corners)  # a linear map attains its extremes at the corners
        hidden_lo, hidden_hi = pre.min(dim=0).values.relu(), pre.max(dim=0).values.relu()
        hidden_corners = torch.tensor(list(itertools.product(*zip(hidden_lo.tolist(), hidden_hi.tolist()))))
        out = model[2](hidden_corners)
        lower, upper = interval_bounds(model, x, eps)
        assert torch.allclose(lower[0], out.min(dim=0).values, atol=1e-6)
        assert torch.allclose(upper[0], out.max(dim=0).values, atol=1e-6)
        # margin bounds merge the specification into the last layer: the min of (W_y - W_j) h + b_y - b_j
        y = torch.tensor([1])
        margin_corners = out[:, 1:2] - out
        assert torch.allclose(margin_lower_bounds(model, x, y, eps)[0], margin_corners.min(dim=0).values, atol=1e-6)


def test_ibp_contains_sampled_outputs_and_is_tighter_on_margins():
    model = tiny_conv()
    x = torch.rand(3, 1, 6, 6)
    y = torch.tensor([0, 1, 2])
    eps = 0.05
    points = sample_ball(x, eps, 200).flatten(0, 1)
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, eps)
        out = model(points).view(200, 3, -1)
        assert (out >= lower - SLACK).all() and (out <= upper + SLACK).all()
        margins = margin_lower_bounds(model, x, y, eps)
        sampled = model_margins(model, points, y.repeat(200)).view(200, 3, -1)
        assert (sampled >= margins - SLACK).all()
        naive = lower.gather(1, y[:, None]) - upper  # differencing logit intervals
        naive.scatter_(1, y[:, None], 0.0)
        assert (margins >= naive - SLACK).all()
        assert (margins.gather(1, y[:, None]) == 0).all()


# ----------------------------------------------------------------------------- CROWN-IBP and symbolic intervals
@pytest.mark.parametrize("method", [CROWN_IBP, SYMBOLIC])
def test_crown_is_exact_on_a_linear_network_and_beats_ibp(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Linear(5, 3))
    x, y, eps = torch.tensor([[0.5, 0.4]]), torch.tensor([2]), 0.3
    lower_in, upper_in = input_box(x, eps)
    corners = torch.tensor(list(itertools.product(*zip(lower_in[0].tolist(), upper_in[0].tolist()))))
    with torch.no_grad():
        exact = model_margins(model, corners, y.repeat(len(corners))).min(dim=0).values
        crown = margin_lower_bounds(model, x, y, eps, method, beta=1.0)[0]
        ibp = margin_lower_bounds(model, x, y, eps, IBP)[0]
    assert torch.allclose(crown, exact, atol=1e-5)
    assert (crown >= ibp - SLACK).all() and (crown > ibp + 1e-3).any()


@pytest.mark.parametrize("method", [CROWN_IBP, SYMBOLIC])
def test_crown_is_exact_when_every_relu_is_stable(method):
    """Symbolic intervals are never looser than IBP where IBP finds every ReLU stable: then (by induction over the
    layers) neither finds an unstable ReLU, and the symbolic bound is the exact one."""
    model = tiny_conv(seed=1)
    x = torch.rand(2, 1, 6, 6) * 0.8 + 0.1  # away from the clip range: the box is the full eps-ball
    y = torch.tensor([3, 1])
    eps = 2e-4
    assert unstable_relus(model, x, eps) == 0
    crown = margin_lower_bounds(model, x, y, eps, method, beta=1.0)
    ibp = margin_lower_bounds(model, x, y, eps, IBP)
    # the network is linear on the box: min margin = margin(x) - eps * ||d margin / dx||_1
    xg = x.clone().requires_grad_(True)
    margins = model_margins(model, xg, y)
    exact = torch.stack([margins[:, j] - eps * torch.autograd.grad(margins[:, j].sum(), xg, retain_graph=True)[0]
                         .abs().flatten(1).sum(dim=1) for j in range(margins.shape[1])], dim=1)
    assert torch.allclose(crown, exact, atol=1e-5)
    assert (crown >= ibp - SLACK).all()


def test_crown_ibp_mixes_and_symbolic_are_valid_lower_bounds_with_unstable_relus():
    model = tiny_conv(seed=2)
    x = torch.rand(4, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 3])
    eps = 0.08
    assert unstable_relus(model, x, eps) > 0
    points = sample_ball(x, eps, 200).flatten(0, 1)
    with torch.no_grad():
        sampled = model_margins(model, points, y.repeat(200)).view(200, 4, -1)
        crown = margin_lower_bounds(model, x, y, eps, CROWN_IBP, beta=1.0)
        ibp = margin_lower_bounds(model, x, y, eps, IBP)
        for beta in (0.0, 0.3, 1.0):
            mixed = margin_lower_bounds(model, x, y, eps, CROWN_IBP, beta=beta)
            assert torch.allclose(mixed, beta * crown + (1 - beta) * ibp, atol=1e-5)
            assert (sampled >= mixed - SLACK).all()
        symbolic = margin_lower_bounds(model, x, y, eps, SYMBOLIC)
        assert (sampled >= symbolic - SLACK).all()
        assert (symbolic.sum(dim=1) > ibp.sum(dim=1)).all()  # tighter here, though not always (below)


def test_crown_can_be_looser_than_ibp():
    """Why Hydra mixes the two: with the adaptive lower slope, one unstable ReLU z in [-1, 2] is bounded by z
    (slope 1, minimum -1) where IBP's relu interval gives 0. Symbolic intervals are not always tighter either: the
    same ReLU becomes s z - s l / 2 +- s l / 2 with s = 2/3, whose range [s l, u] = [-2/3, 2] reaches below 0."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0], [0.0]])), model[2].bias.zero_()
    x, y = torch.tensor([[0.5]]), torch.tensor([0])
    kwargs = dict(clip_min=-10.0, clip_max=10.0)
    ibp = margin_lower_bounds(model, x, y, 1.5, IBP, **kwargs)
    crown = margin_lower_bounds(model, x, y, 1.5, CROWN_IBP, beta=1.0, **kwargs)
    assert ibp[0, 1].item() == pytest.approx(0.0) and crown[0, 1].item() == pytest.approx(-1.0)
    assert margin_lower_bounds(model, x, y, 1.5, SYMBOLIC, **kwargs)[0, 1].item() == pytest.approx(-2 / 3)


def symbolic_reference(model, lower, upper, y):
    """Symbolic interval analysis of one point through a Sequential of Linear and ReLU, neuron by neuron in plain
    Python: each neuron is (centre, [coefficient of every generator]); the margins concretised at the end."""
    neurons = [((lo + hi) / 2, [(hi - lo) / 2 if i == j else 0.0 for j in range(len(lower))])
               for i, (lo, hi) in enumerate(zip(lower, upper))]
    for layer in model:
        count = len(neurons[0][1])
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight.tolist(), layer.bias.tolist()
            neurons = [(b + sum(w * c for w, (c, _) in zip(row, neurons)),
                        [sum(w * g[k] for w, (_, g) in zip(row, neurons)) for k in range(count)])
                       for row, b in zip(weight, bias)]
            continue
        relaxed, new = [], []
        for centre, coeffs in neurons:
            lo, hi = centre - sum(map(abs, coeffs)), centre + sum(map(abs, coeffs))
            if hi <= 0:
                relaxed.append((0.0, [0.0] * count))
            elif lo >= 0:
                relaxed.append((centre, coeffs))
            else:  # between s z and s (z - lo): s z - s lo / 2 and an error generator of size -s lo / 2
                slope = hi / (hi - lo)
                relaxed.append((slope * centre - slope * lo / 2, [slope * g for g in coeffs]))
                new.append((len(relaxed) - 1, -slope * lo / 2))
        neurons = [(c, g + [size if index == i else 0.0 for index, size in new]) for i, (c, g) in enumerate(relaxed)]
    centre_y, coeffs_y = neurons[y]
    return [centre_y - c - sum(abs(a - b) for a, b in zip(coeffs_y, g)) for c, g in neurons]


@pytest.mark.parametrize("x, eps", [([0.4, 0.6], 0.2), ([0.05, 0.9], 0.2), ([0.5, 0.5], 0.45)])
def test_symbolic_equals_a_neuron_by_neuron_reference_and_contains_brute_force_ranges(x, eps):
    torch.manual_seed(7)
    deep = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    for model in (two_input_net(), deep):
        x_t = torch.tensor([x])
        lower, upper = input_box(x_t, eps)
        with torch.no_grad():
            for label in range(model[-1].out_features):
                y = torch.tensor([label])
                bound = margin_lower_bounds(model, x_t, y, eps, SYMBOLIC)[0]
                expected = symbolic_reference(model, lower[0].tolist(), upper[0].tolist(), label)
                assert torch.allclose(bound, torch.tensor(expected), atol=1e-5)
                grid = torch.stack(torch.meshgrid(*(torch.linspace(lo, hi, 101) for lo, hi in
                                                    zip(lower[0].tolist(), upper[0].tolist())), indexing="ij"), -1)
                brute = model_margins(model, grid.view(-1, 2), y.repeat(101 * 101)).min(dim=0).values
                assert (bound <= brute + SLACK).all()
    # the comparison is not vacuous: the deep net has unstable ReLUs on the widest box
    assert unstable_relus(deep, torch.tensor([[0.5, 0.5]]), 0.45) > 0


def test_symbolic_bounds_of_a_point_do_not_depend_on_its_batch():
    """Points pass in chunks of SYMBOLIC_CHUNK, each padded to the error generators of its most unstable point."""
    model = tiny_conv(seed=8)
    x = torch.rand(SYMBOLIC_CHUNK + 5, 1, 6, 6)
    y = torch.arange(len(x)) % 4
    with torch.no_grad():
        together = margin_lower_bounds(model, x, y, 0.05, SYMBOLIC)
        alone = torch.cat([margin_lower_bounds(model, x[i:i + 1], y[i:i + 1], 0.05, SYMBOLIC) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)


# ----------------------------------------------------------------------------- evaluation
def test_verified_points_resist_pgd():
    model = tiny_conv(seed=3)
    x_train, y_train = quadrant_data(64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    x, _ = quadrant_data(32, seed=1)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # every point correct: the comparison is about robustness only
    eps = 0.003
    is_verified = verified(model, x, y, eps=eps)
    assert 0 < int(is_verified.sum()) < len(y)  # the comparison is not vacuous
    x_adv = pgd(model, x, y, ThreatModel(eps=eps, step_size=eps / 4, steps=20))
    with torch.no_grad():
        pgd_correct = model(x_adv).argmax(dim=1) == y
    assert not (is_verified & ~pgd_correct).any()
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    accuracy = verified_accuracy(model, batches, eps=eps)
    assert accuracy == pytest.approx(100.0 * float(is_verified.float().mean()))
    assert accuracy <= 100.0 * float(pgd_correct.float().mean())
    crown_accuracy = verified_accuracy(model, batches, eps=eps, method=CROWN_IBP, beta=1.0)
    assert crown_accuracy <= 100.0 * float(pgd_correct.float().mean())
    symbolic = verified(model, x, y, eps=eps, method=SYMBOLIC)
    assert not (symbolic & ~pgd_correct).any()
    assert verified_accuracy(model, batches, eps=eps, method=SYMBOLIC) <= 100.0 * float(pgd_correct.float().mean())


def test_verification_sums_restore_modes_and_report_natural_accuracy():
    model = tiny_conv(seed=3).train()
    x = torch.rand(8, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    sums = verification_sums(model, [(x, y)], eps=0.0)
    assert model.training
    assert sums["n"] == 8 and sums["natural_correct"] == 8 and sums["robust_correct"] == 8  # eps 0: exact


# ----------------------------------------------------------------------------- masked layers
def _zeroed_copy(masked_model, plain_model):
    zeroed = copy.deepcopy(plain_model)
    for (name, layer) in masked_layers(masked_model):
        with torch.no_grad():
            zeroed.get_submodule(name).weight.mul_(layer.mask())
    return zeroed


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_layers_bound_their_effective_weight(granularity):
    plain = tiny_conv(seed=4)
    masked = copy.deepcopy(plain)
    sparsify(masked, granularity, keep_min=0.3)
    zeroed = _zeroed_copy(masked, plain)
    x, y, eps = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2]), 0.03
    for method in (IBP, SYMBOLIC, CROWN_IBP):
        with torch.no_grad():
            learned = margin_lower_bounds(masked, x, y, eps, method, beta=0.7)
            expected = margin_lower_bounds(zeroed, x, y, eps, method, beta=0.7)
            assert torch.allclose(learned, expected, atol=1e-5)
            assert not torch.allclose(expected, margin_lower_bounds(plain, x, y, eps, method, beta=0.7), atol=1e-3)
    freeze_masks(masked)
    with torch.no_grad():
        for method in (IBP, SYMBOLIC, CROWN_IBP):
            assert torch.allclose(margin_lower_bounds(masked, x, y, eps, method, beta=0.7),
                                  margin_lower_bounds(zeroed, x, y, eps, method, beta=0.7), atol=1e-5)


def test_crown_ibp_loss_reaches_scores_and_rates_of_learning_masks():
    model = tiny_conv(seed=5)
    sparsify(model, "weight", keep_min=0.3)
    loss, _ = crown_ibp_loss(model, torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3]), eps=0.02, beta=0.5)
    loss.backward()
    for _, layer in masked_layers(model):
        assert layer.popup_scores.grad is not None and layer.popup_scores.grad.abs().sum() > 0
        assert layer.k_score.grad is not None


def test_symbolic_loss_reaches_scores_and_rates_of_learning_masks():
    model = tiny_conv(seed=5)
    sparsify(model, "weight", keep_min=0.3)
    loss, _ = worst_case_loss(model, torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3]), eps=0.05, method=SYMBOLIC)
    loss.backward()
    for _, layer in masked_layers(model):
        assert layer.popup_scores.grad is not None and layer.popup_scores.grad.abs().sum() > 0
        assert layer.k_score.grad is not None


# ----------------------------------------------------------------------------- training
def test_crown_ibp_loss_at_eps_zero_is_cross_entropy():
    model = tiny_conv(seed=6)
    x, y = quadrant_data(8, seed=2)
    loss, worst_logits = crown_ibp_loss(model, x, y, eps=0.0, beta=0.5)
    assert worst_logits.shape == (8, 4)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)  # -margins = logits - z_y
    loss, worst_logits = worst_case_loss(model, x, y, eps=0.0, method=SYMBOLIC)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def test_crown_ibp_training_lowers_the_loss():
    model = tiny_conv(seed=6)
    x, y = quadrant_data(64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, _ = crown_ibp_loss(model, x, y, eps=0.002, beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_schedule_ramps_eps_linearly_and_hands_over_from_crown_to_ibp():
    kwargs = dict(steps_per_epoch=10, eps=0.008, schedule_length=3)
    # ramp from the start of epoch 0 to the start of epoch 3 - 1 = 2, i.e. over 20 steps
    assert crown_ibp_schedule(0, 0, **kwargs) == (0.0, 1.0)
    eps_t, beta_t = crown_ibp_schedule(0, 5, **kwargs)
    assert eps_t == pytest.approx(0.008 * 5 / 20) and beta_t == pytest.approx(1 - 5 / 20)
    assert crown_ibp_schedule(1, 0, **kwargs) == pytest.approx((0.004, 0.5))
    assert crown_ibp_schedule(2, 0, **kwargs) == pytest.approx((0.008, 0.0))
    assert crown_ibp_schedule(7, 3, **kwargs) == pytest.approx((0.008, 0.0))
    # prune / finetune stages in Hydra's scripts: schedule_length 1, the full eps and pure IBP at once
    assert crown_ibp_schedule(0, 0, steps_per_epoch=10, eps=0.008, schedule_length=1) == pytest.approx((0.008, 0.0))
    # starting_eps and schedule_start shift the ramp
    assert crown_ibp_schedule(2, 0, steps_per_epoch=10, eps=0.008, schedule_length=3, schedule_start=1,
                              starting_eps=0.002) == pytest.approx((0.005, 0.375))


# ----------------------------------------------------------------------------- errors
def test_unsupported_modules_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UserError, match=r"'1' \(BatchNorm2d"):
        interval_bounds(model, torch.rand(1, 1, 4, 4), 0.1)
    with pytest.raises(UserError, match="nn.Sequential"):
        interval_bounds(create_model("small_cnn", num_classes=10, in_channels=1), torch.rand(1, 1, 8, 8), 0.1)
    with pytest.raises(UserError, match="method"):
        margin_lower_bounds(two_input_net(), torch.rand(1, 2), torch.tensor([0]), 0.1, method="crown")


# ----------------------------------------------------------------------------- Hydra's models
HYDRA_KEYS = {"cifar_model": ["0", "2", "5", "7"], "cifar_model_large": ["0", "2", "4", "6", "9", "11", "13"]}


@pytest.mark.parametrize("name", sorted(HYDRA_KEYS))
def test_hydra_models_keep_hydra_parameter_names_and_sizes(name):
    model = create_model(name, num_classes=10)
    assert name in list_models()
    assert list(model.state_dict()) == [f"{i}.{p}" for i in HYDRA_KEYS[name] for p in ("weight", "bias")]
    first_linear = [m for m in model if isinstance(m, nn.Linear)][0]
    assert first_linear.in_features == {"cifar_model": 32 * 8 * 8, "cifar_model_large": 64 * 8 * 8}[name]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(HYDRA_KEYS))
def test_hydra_models_on_digits_and_mnist_sizes(name):
    channels = {"cifar_model": 32, "cifar_model_large": 64}[name]
    for side, spatial in ((8, 2), (28, 7)):
        model = MODELS.get(name)(num_classes=10, in_channels=1, input_size=side)
        assert [m for m in model if isinstance(m, nn.Linear)][0].in_features == channels * spatial * spatial
        x = torch.rand(2, 1, side, side)
        lower, upper = interval_bounds(model, x, 0.01)
        with torch.no_grad():
            out = model(x)
        assert ((out >= lower - SLACK) & (out <= upper + SLACK)).all()
    with pytest.raises(UserError, match="8x8"):
        MODELS.get(name)(num_classes=10, in_channels=1, input_size=8)(torch.rand(1, 1, 28, 28))


def test_hydra_model_with_normalization_bounds_validly_and_exactly():
    model = create_model("cifar_model", num_classes=10, in_channels=1, normalize=True, mean=[0.3], std=[0.4])
    plain = create_model("cifar_model", num_classes=10, in_channels=1)
    plain.load_state_dict(model.state_dict())  # normalisation adds no keys
    x = torch.rand(3, 1, 32, 32) * 0.8 + 0.1  # away from the clip range: the box is the full eps-ball
    y = torch.tensor([1, 2, 3])
    eps = 0.01
    points = sample_ball(x, eps, 40).flatten(0, 1)
    with torch.no_grad():
        sampled = model_margins(model, points, y.repeat(40)).view(40, 3, -1)
        for method in (IBP, SYMBOLIC, CROWN_IBP):
            assert (sampled >= margin_lower_bounds(model, x, y, eps, method) - SLACK).all()
        # (x - mean) / std maps the eps-ball onto the (eps / std)-ball around the normalised point
        lower, upper = interval_bounds(model, x, eps)
        expected = interval_bounds(plain, (x - 0.3) / 0.4, eps / 0.4, clip_min=-100.0, clip_max=100.0)
        assert torch.allclose(lower, expected[0], atol=1e-4) and torch.allclose(upper, expected[1], atol=1e-4)
