"""FMN (trainers/attacks/fmn.py), its tuning (trainers/attacks/fmn_tune.py) and security curves, on small digits models.

The models are trained here for a fraction of a second on scikit-learn's 8x8 digits, so the distances are
those of a real classifier. FMN is checked against an independent implementation, adv-lib's `fmn` (test-only
dependency, `pip install --no-deps adv-lib==0.2.8`: its package imports `visdom` for plotting, which FMN does not
use and whose sdist no longer builds with setuptools >= 81, so the test puts an empty module in its place).
"""
import copy
import json
import math
import sys
import types

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from configs.errors import UserError
from tests.conftest import InputRecorder, single_thread
from trainers.attacks.fmn import (LOSSES, OPTIMIZERS, SCHEDULES, failures_as_zero, fmn, fmn_batches,
                          robust_accuracy_at, security_curve)
from trainers.attacks.fmn_tune import SearchSpace, tune_fmn
from trainers.attacks.threat import L2, LINF, perturbation_norms
from trainers.evaluation.ap_protocol import ap_eps_grid

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, TEST = slice(0, 1200), slice(1400, 1600)


def _digits(inset: float):
    """Digits scaled into [inset, 1 - inset] (0: the usual [0, 1]) as [N, 1, 8, 8] tensors."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return inset + (1 - 2 * inset) * x, torch.tensor(d.target)


def _train(x, y, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[TRAIN]), y[TRAIN]).backward()
        optimizer.step()
    return model.eval()


def _trained_on(inset: float):
    with single_thread():
        with torch.random.fork_rng():
            x, y = _digits(inset)
            return _train(x, y), x[TEST], y[TEST]


@pytest.fixture(scope="module")
def digits():
    """A digits MLP (about 87 % test accuracy, so the test points include clean errors) and 200 test points."""
    return _trained_on(0.0)


@pytest.fixture(scope="module")
def inset_digits():
    """The same on digits inset to [0.1, 0.9]: with pixels off the box edges FMN's L2 boundary start works."""
    return _trained_on(0.1)


def _adv_lib_fmn():
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))
    from adv_lib.attacks import fmn as reference
    return reference


@pytest.mark.filterwarnings("ignore:distutils Version classes are deprecated")
@pytest.mark.parametrize("norm", [LINF, L2])
def test_median_distance_agrees_with_adv_lib(inset_digits, norm):
    model, x, y = inset_digits
    reference = _adv_lib_fmn()
    # FMN as published: logit-difference loss, normalised step, cosine alpha 1 -> 0.01, boundary start.
    ours = fmn(model, x, y, norm=norm, steps=100, loss="ld", optimizer="plain", schedule="cosine", alpha_init=1.0,
               eps_start="boundary")
    x_ref = reference(model, x, y, norm=math.inf if norm == LINF else 2, steps=100, α_init=1.0)
    with torch.no_grad():
        broken = model(x_ref).argmax(dim=1) != y
    ref = perturbation_norms(x_ref, x, norm)
    ref[~broken] = math.inf
    ours_median, ref_median = float(ours.distances.median()), float(ref.median())
    assert math.isfinite(ref_median) and abs(ours_median - ref_median) <= 0.05 * ref_median
    assert abs(float(ours.found.double().mean()) - float(broken.double().mean())) <= 0.05
    # Same algorithm, so point by point too: nearly every point both break gets the same distance.
    both = ours.found & broken & (ref > 0)
    same = (ours.distances[both] - ref[both]).abs() <= 1e-4 * ref[both]
    assert both.sum() >= 0.5 * len(y) and same.double().mean() >= 0.95


@pytest.mark.filterwarnings("ignore:distutils Version classes are deprecated")
def test_default_breaks_every_point_in_l2(digits):
    """Why the default loss is CE: most digits pixels sit at 0 or 1, so the logit-difference boundary estimate
    counts gradient components the box blocks, falls short, and FMN (ours and adv-lib's) approaches the boundary
    from the inside without crossing it; the default configuration breaks every point."""
    model, x, y = digits
    x_ref = _adv_lib_fmn()(model, x, y, norm=2, steps=100)
    with torch.no_grad():
        assert (model(x_ref).argmax(dim=1) != y).double().mean() < 0.5
    assert fmn(model, x, y, norm=L2, steps=100, loss="ld", eps_start="boundary").found.double().mean() < 0.5
    assert fmn(model, x, y, norm=L2, steps=100).found.all()


def test_clean_errors_have_distance_zero_and_the_rest_a_positive_one(digits):
    model, x, y = digits
    result = fmn(model, x, y, norm=LINF, steps=50)
    with torch.no_grad():
        clean_correct = model(x).argmax(dim=1) == y
    assert (~clean_correct).sum() >= 5, "the fixture should contain clean errors"
    assert torch.equal(result.clean_correct, clean_correct)
    assert (result.distances[~clean_correct] == 0).all()
    assert (result.distances[clean_correct] > 0).all()
    assert result.distances.dtype == torch.float64 and result.distances.device.type == "cpu"


CONFIGS = [dict(loss=loss, optimizer=opt, schedule=sch) for loss in LOSSES for opt in OPTIMIZERS for sch in SCHEDULES]


@pytest.mark.parametrize("norm", [LINF, L2])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_every_returned_point_is_adversarial_in_the_box_at_the_reported_distance(digits, norm, config):
    model, x, y = digits
    x, y = x[:60], y[:60]
    alpha = 1.0 if config["optimizer"] == "plain" or norm == L2 else 0.05
    # FMN's boundary start stalls in L2 on these box-saturated digits (test_default_breaks_every_point_in_l2).
    start = "boundary" if norm == LINF else "unbounded"
    result = fmn(model, x, y, norm=norm, steps=40, alpha_init=alpha, eps_start=start, **config)
    found = result.found
    assert found.double().mean() >= 0.9
    with torch.no_grad():
        prediction = model(result.x_adv).argmax(dim=1)
    assert (prediction[found] != y[found]).all()
    assert torch.equal(result.x_adv[~found], x[~found])
    assert torch.equal(perturbation_norms(result.x_adv, x, norm)[found], result.distances[found])
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0


@pytest.mark.parametrize("norm", [LINF, L2])
def test_targeted_mode_reaches_the_target(digits, norm):
    model, x, y = digits
    x, y = x[:60], y[:60]
    targets = (y + 3) % 10
    result = fmn(model, x, y, norm=norm, steps=60, targeted=True, targets=targets)
    found = result.found
    assert found.double().mean() >= 0.9
    with torch.no_grad():
        assert (model(result.x_adv[found]).argmax(dim=1) == targets[found]).all()
    untargeted = fmn(model, x, y, norm=norm, steps=60)
    # Reaching one given class is never easier than leaving the true one (for clean-correct points).
    both = found & untargeted.found & untargeted.clean_correct
    assert (result.distances[both] >= untargeted.distances[both] * (1 - 0.05)).float().mean() >= 0.9


def test_more_steps_find_smaller_distances(digits):
    model, x, y = digits
    short = fmn(model, x, y, norm=LINF, steps=10)
    long = fmn(model, x, y, norm=LINF, steps=100)
    assert float(long.distances.median()) <= float(short.distances.median()) * 1.01


def test_eval_mode_during_the_attack_modes_restored_and_no_parameter_gradients(digits):
    base, x, y = digits
    base = copy.deepcopy(base)
    model = nn.Sequential(nn.Dropout(0.5), base)
    model.train()
    base[0].train(False)  # a mixed state that must come back as it was
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(module.training))
    fmn(model, x[:20], y[:20], norm=L2, steps=5)
    assert seen and not any(seen)
    assert model.training and model[0].training and not base[0].training
    assert all(p.grad is None for p in model.parameters())


def test_fmn_batches_concatenates_and_equals_one_batch(digits):
    model, x, y = digits
    whole = fmn(model, x[:40], y[:40], norm=LINF, steps=20)
    split = fmn_batches(model, [(x[:15], y[:15]), (x[15:40], y[15:40])], norm=LINF, steps=20, keep_adv=True)
    assert torch.allclose(split.distances, whole.distances, rtol=1e-5, atol=1e-7)
    assert torch.equal(split.clean_correct, whole.clean_correct) and split.x_adv.shape == x[:40].shape
    assert fmn_batches(model, [(x[:15], y[:15])], norm=LINF, steps=5).x_adv is None


def test_bad_settings_are_user_errors(digits):
    model, x, y = digits
    for bad in (dict(loss="hinge"), dict(optimizer="rmsprop"), dict(schedule="step"), dict(alpha_init=0.0),
                dict(momentum=1.0), dict(eps_start="zero"), dict(stepsize=0.1)):
        with pytest.raises(UserError):
            fmn(model, x[:4], y[:4], norm=LINF, steps=2, **bad)
    with pytest.raises(UserError):
        fmn(model, x[:4], y[:4], norm="l1", steps=2)
    with pytest.raises(UserError):
        fmn(model, x[:4], y[:4], norm=LINF, steps=2, targeted=True)
    with pytest.raises(UserError):
        fmn(model, x[:4] * 2, y[:4], norm=LINF, steps=2)


# ------------------------------------------------------------------------------------------------ curves
def test_security_curve_from_fmn_distances(digits):
    model, x, y = digits
    result = fmn(model, x, y, norm=LINF, steps=50)
    curve = security_curve(result.distances, [0.2, 0.0, 0.05, 0.1, 1.0])
    assert [p["eps"] for p in curve] == [0.0, 0.05, 0.1, 0.2, 1.0]
    accs = [p["robust_acc"] for p in curve]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    # At eps 0 robust accuracy is clean accuracy: clean errors sit at distance 0 and are never robust.
    assert accs[0] == pytest.approx(100.0 * float(result.clean_correct.double().mean()))
    assert accs[2] == robust_accuracy_at(result.distances, 0.1)
    assert 0 < accs[2] < accs[0]
    json.dumps(curve)


def test_curve_counting_conventions():
    d = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.3, math.inf], dtype=torch.float64)
    assert robust_accuracy_at(d, 0.0) == pytest.approx(100 * 4 / 6)
    assert robust_accuracy_at(d, 0.1) == pytest.approx(100 * 2 / 6)  # distance exactly eps is broken at eps
    assert robust_accuracy_at(d, 10.0) == pytest.approx(100 / 6)     # never broken: robust at every budget
    assert robust_accuracy_at(failures_as_zero(d), 10.0) == 0.0        # the AP benchmark's pessimistic count
    grid = ap_eps_grid()
    assert len(grid) == 1000 and grid[0] == 0.0 and grid[-1] == pytest.approx(0.15)
    for bad in ([], [math.nan], [-0.1]):
        with pytest.raises(UserError):
            security_curve(d if bad else [], bad or [0.1])


# ------------------------------------------------------------------------------------------------ tuning
def _rows_in(seen_rows, points):
    """Which of `points` occur exactly among the recorded input rows."""
    seen = {tuple(r) for r in seen_rows.tolist()}
    return torch.tensor([tuple(p.tolist()) in seen for p in points.flatten(1)])


@pytest.mark.parametrize("search", ["random", "halving"])
def test_tuning_picks_its_best_trial_and_touches_only_the_tuning_points(digits, search):
    model, x, y = digits
    spy = InputRecorder(model)
    tune_x, tune_y, held_x = x[:48], y[:48], x[48:]
    batches = ((tune_x[i:i + 16], tune_y[i:i + 16]) for i in range(0, 48, 16))  # a one-shot generator
    result = tune_fmn(spy, batches, 6, search=search, seed=1, norm=LINF, steps=24)

    seen = torch.cat(spy.rows)
    assert _rows_in(seen, tune_x).all()
    assert not _rows_in(seen, held_x).any()
    assert seen.shape[0] % 48 == 0  # whole passes over the tuning points, nothing else

    final_round = max(t["round"] for t in result.trials)
    final = [t for t in result.trials if t["round"] == final_round]
    assert all(t["steps"] == 24 and t["n_points"] == 48 for t in final)
    best = min(final, key=lambda t: (t["median_distance"], -t["found_rate"]))
    assert result.best_trial == best["trial"]
    assert result.config == {k: best[k] for k in result.config}
    if search == "random":
        assert sorted(t["trial"] for t in result.trials) == list(range(6))
    else:  # 6 draws, eta 2: 6 -> 3 -> 2 configurations, steps 6 -> 12 -> 24 (at least 10)
        assert [sum(t["round"] == r for t in result.trials) for r in range(3)] == [6, 3, 2]
        assert [t["steps"] for t in result.trials if t["round"] == 0][0] == 10
    json.dumps(result.config)

    # The chosen configuration reproduces its median (FMN draws no random numbers).
    again = fmn_batches(model, [(tune_x, tune_y)], norm=LINF, steps=24, **result.config)
    assert float(again.distances[again.clean_correct].median()) == pytest.approx(best["median_distance"], rel=1e-5)


def test_tuning_is_deterministic_and_respects_the_space(digits):
    model, x, y = digits
    space = SearchSpace(losses=("dlr",), optimizers=("sgd",), schedules=("cosine",), alpha_init=(0.01, 0.1))
    runs = [tune_fmn(model, [(x[:32], y[:32])], 3, seed=7, norm=L2, steps=10, space=space) for _ in range(2)]
    untimed = [[{k: v for k, v in t.items() if k != "seconds"} for t in run.trials] for run in runs]
    assert untimed[0] == untimed[1] and runs[0].config == runs[1].config
    for trial in runs[0].trials:
        assert trial["loss"] == "dlr" and trial["optimizer"] == "sgd" and 0.01 <= trial["alpha_init"] <= 0.1
    with pytest.raises(UserError):
        tune_fmn(model, [(x[:8], y[:8])], 2, search="bayes", steps=2)
