"""test.py's `fmn` entry, its tuning split, the AP preset, the gradient-masking checks, and FMN in tables and plots.

The attacked models are trained here in a fraction of a second on scikit-learn's 8x8 digits (so distances are
those of a real classifier, with clean errors among the points); test.py runs end to end on a digits checkpoint
and, under --attack-preset ap, on a tiny CIFAR-10-format fixture.
"""
import json
import logging
import math
import os

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from configs.errors import UserError
from data import build_data
from scripts import make_tables, plots
from tests.conftest import InputRecorder, load_entry_point, single_thread
from trainers.attacks.threat import LINF, ThreatModel
from trainers.evaluation import masking_checks
from trainers.evaluation.ap_protocol import AP_AA_EPS, AP_EPS, AP_PRESET
from trainers.evaluation.minimum_norm import (FAILURES_INF, FAILURES_ZERO, FMNOptions, ap_fmn_plan,
                                              counted_distances, default_eps_grid, fmn_entry, read_distances,
                                              resolve_distances_file, tuning_points)
from trainers.evaluation.registry import EvalSettings, parse_attacks
from trainers.evaluation.suite import clean_pass, run_suite

try:
    import fakedata
except ImportError:  # pragma: no cover
    from tests import fakedata

test_py = load_entry_point("test.py", "harp_test_entry_fmn")
pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


@pytest.fixture(scope="module")
def digits():
    """A digits MLP (about 90 % clean accuracy: the points include clean errors), tuning and test points."""
    with single_thread():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            d = load_digits()
            x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
            y = torch.tensor(d.target)
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(60):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
                optimizer.step()
    return model.eval(), (x[1200:1248], y[1200:1248]), (x[1400:1560], y[1400:1560])


def batches_of(x, y, size):
    return lambda: [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def settings(**kw):
    threat = ThreatModel(eps=EPS, step_size=EPS / 4, steps=10, norm=LINF)
    return EvalSettings(threat=threat, seed=0, show_progress=False, **kw)


# ------------------------------------------------------------------------------------------ the entry
def test_fmn_entry_distances_curve_and_bounds(digits, tmp_path):
    model, _, (x, y) = digits
    out = run_suite(model, batches_of(x, y, 50), parse_attacks("natural,pgd50,fmn"), settings(),
                    options={"fmn": FMNOptions(steps=100, artifact_stem=str(tmp_path / "model_best_standard"))})
    entry, pgd50 = out["attacks"]["fmn"], out["attacks"]["pgd50"]
    # FMN finds at least what PGD-50 finds at the same eps (up to a point), never more than natural accuracy.
    assert entry["robust_acc"] <= pgd50["robust_acc"] + 1.0
    assert entry["robust_acc"] <= out["natural_acc"]
    assert entry["eps"] == EPS and entry["norm"] == LINF and entry["counting"] == FAILURES_INF
    assert entry["max_perturbation"] <= EPS
    # The fixed grid: 0 to 3 eps in eps/8 steps, eps on it, robust accuracy never rising, natural accuracy at 0.
    curve = entry["curve"]
    assert [p["eps"] for p in curve] == default_eps_grid(EPS) and len(curve) == 25
    accs = [p["robust_acc"] for p in curve]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert accs[0] == pytest.approx(out["natural_acc"])
    assert curve[8]["eps"] == EPS and curve[8]["robust_acc"] == entry["robust_acc"]

    record = read_distances(resolve_distances_file(str(tmp_path / "model_best_standard.json"), entry))
    assert entry["distances_file"] == "model_best_standard_fmn_distances.pt"
    assert torch.equal(record["labels"], y) and torch.equal(record["indices"], torch.arange(len(y)))
    distances, correct = record["distances"], record["clean_correct"]
    assert (~correct).sum() == entry["clean_errors"] > 0
    assert (distances[~correct] == 0).all() and (distances[correct] > 0).all()
    assert entry["robust_acc"] == pytest.approx(100.0 * float((distances > EPS).double().mean()))
    assert entry["median_distance"] == pytest.approx(float(distances[correct].median()))
    json.dumps(entry, allow_nan=False)


def test_failures_count_as_robust_by_default_and_as_broken_under_ap():
    record = {"distances": torch.tensor([0.0, 0.02, math.inf], dtype=torch.float64), "counting": FAILURES_INF}
    assert counted_distances(record).tolist() == [0.0, 0.02, math.inf]
    assert counted_distances(dict(record, counting=FAILURES_ZERO)).tolist() == [0.0, 0.02, 0.0]


def _count(rows, points):
    seen = {}
    for row in torch.cat(rows).flatten(1).tolist():
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    return [seen.get(tuple(p), 0) for p in points.flatten(1).tolist()]


def test_tuning_never_touches_the_evaluated_points(digits):
    model, (x_tune, y_tune), (x, y) = digits
    x, y = x[:40], y[:40]
    spy = InputRecorder(model)
    make = batches_of(x, y, 16)
    clean = clean_pass(spy, make, show_progress=False)
    spy.rows.clear()
    steps = 12
    options = FMNOptions(steps=steps, tune=3, tuning_batches=batches_of(x_tune, y_tune, 16),
                         tuning_split="held-out digits")
    entry = fmn_entry(spy, make, settings(), options, clean)
    # FMN's first step runs at the clean point: each evaluated point once (the final attack, in none of the 3 tuning
    # trials), each tuning point at least once per trial (more where a step leaves it in place).
    assert _count(spy.rows, x) == [1] * len(y)
    assert min(_count(spy.rows, x_tune)) >= 3
    tuning = entry["tuning"]
    assert tuning["split"] == "held-out digits" and tuning["n_configs"] == 3 and len(tuning["trials"]) == 3
    chosen = next(t for t in tuning["trials"] if t["trial"] == tuning["best_trial"])
    assert entry["config"] == {k: chosen[k] for k in entry["config"]}


def test_tuning_needs_tuning_points(digits):
    model, _, (x, y) = digits
    make = batches_of(x[:8], y[:8], 8)
    with pytest.raises(UserError, match="tuning points"):
        fmn_entry(model, make, settings(), FMNOptions(steps=2, tune=2), clean_pass(model, make, show_progress=False))


@pytest.mark.parametrize("val_split", [0.0, 0.2])
def test_the_default_tuning_split_holds_no_test_point(val_split):
    data = build_data("digits", data_dir="unused", val_split=val_split, seed=3)
    make, split = tuning_points(data, 40, seed=3)
    tune_x = torch.cat([x for x, _ in make()])
    assert tune_x.shape[0] == 40 and ("validation" if val_split else "training") in split
    test_x = torch.cat([x for x, _ in data.test_batches(500)])
    assert not any(_count([test_x], tune_x))
    if val_split:
        val_x = torch.cat([x for x, _ in data.val_batches(500)])
        assert all(_count([val_x], tune_x))
    assert torch.equal(torch.cat([x for x, _ in make()]), tune_x)  # the same points every time


def test_ap_plan_is_the_benchmarks_and_records_deviations():
    plan = ap_fmn_plan(FMNOptions(), 10_000)
    assert (plan.points, plan.tune_points, plan.steps, plan.tune_steps, plan.trials) == ((2048, 2176), (0, 64), 200,
                                                                                         100, 32)
    assert plan.eps == AP_EPS and plan.norm == LINF and plan.counting == FAILURES_ZERO and not plan.deviations
    assert len(plan.grid) == 1000 and plan.grid[-1] == pytest.approx(0.15)
    assert (plan.space.losses, plan.space.optimizers, plan.space.schedules) == (("dlr",), ("sgd",), ("cosine",))
    small = ap_fmn_plan(FMNOptions(tune=4), 100)
    assert small.points == (64, 100) and small.trials == 4 and len(small.deviations) == 2
    with pytest.raises(UserError, match="more"):
        ap_fmn_plan(FMNOptions(), 64)


# ------------------------------------------------------------------------------------------ gradient masking
class _Randomised(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.01 * torch.randn_like(x))


class _Softmax(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(dim=1)


class _Quantised(nn.Module):
    """Rounds its input first: the input gradient is exactly zero everywhere (obfuscated gradients)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def test_model_checks_flag_what_official_autoattack_flags(digits, caplog):
    model, _, (x, y) = digits
    make = batches_of(x[:32], y[:32], 32)
    clean = masking_checks.gradient_masking_report(model, make, {})
    assert clean["flagged"] == [] and set(clean["checks"]) == {"randomised_output", "probability_output",
                                                                "zero_gradients"}
    cases = {"randomised_output": _Randomised(model), "probability_output": _Softmax(model),
             "zero_gradients": _Quantised(model)}
    for name, wrapped in cases.items():
        with caplog.at_level(logging.WARNING):
            report = masking_checks.gradient_masking_report(wrapped, make, {})
        assert report["flagged"] == [name], name
        assert name in caplog.text
    assert masking_checks.zero_gradients(_Quantised(model), x[:32], y[:32])["zero_gradient_points"] == 32


def _aa(*accs):
    return {"autoattack": {"robust_acc": accs[-1], "eps": EPS, "norm": LINF, "per_component": {
        name: {"robust_acc": a} for name, a in zip(("apgd-ce", "apgd-t", "fab-t", "square"), accs)}}}


def _fmn(acc_at_eps, counting=FAILURES_INF, failures=0):
    curve = [{"eps": 0.0, "robust_acc": 99.0}, {"eps": EPS, "robust_acc": acc_at_eps}, {"eps": 2 * EPS,
                                                                                          "robust_acc": 1.0}]
    return {"robust_acc": acc_at_eps, "eps": EPS, "norm": LINF, "curve": curve, "counting": counting,
            "failures": failures}


def test_square_and_minimum_norm_checks():
    assert not masking_checks.square_after_white_box(_aa(60.0, 59.0, 59.0, 58.9))["flagged"]
    flagged = masking_checks.square_after_white_box(_aa(60.0, 59.0, 59.0, 55.0))
    assert flagged["flagged"] and flagged["before"] == 59.0 and flagged["after"] == 55.0
    assert masking_checks.square_after_white_box({"pgd10": {"robust_acc": 1.0}}) is None

    attacks = {"pgd50": {"robust_acc": 70.0, "eps": EPS, "norm": LINF}, "pgd10": {"robust_acc": 72.0, "eps": EPS,
                                                                                    "norm": LINF}}
    assert masking_checks.minimum_norm_below_fixed_budget(attacks) is None  # no FMN
    close = masking_checks.minimum_norm_below_fixed_budget(dict(attacks, fmn=_fmn(68.0)))
    assert not close["flagged"] and close["attack"] == "pgd50"
    far = masking_checks.minimum_norm_below_fixed_budget(dict(attacks, fmn=_fmn(50.0, FAILURES_ZERO, 3)))
    assert far["flagged"] and far["gap"] == pytest.approx(20.0) and "3 FMN failures" in far["detail"]
    # A fixed-budget attack at another eps is compared with the curve at the largest grid eps below it.
    other = {"autoattack": {"robust_acc": 90.0, "eps": 1.5 * EPS, "norm": LINF}, "fmn": _fmn(50.0)}
    assert masking_checks.minimum_norm_below_fixed_budget(other)["fmn_eps"] == EPS


def test_minimum_norm_check_scales_its_threshold_when_fmn_and_autoattack_saw_different_points():
    """The AP preset: FMN on test points [2048, 2176), AutoAttack on the first 10,000. A 7-point gap is within two
    standard errors of 47 % on 128 points (4.41 each), so it is sampling, not masking; on the same points it flags."""
    fmn = dict(_fmn(40.0, FAILURES_ZERO), points=[2048, 2176], n_points=128)
    aa = {"robust_acc": 47.0, "eps": EPS, "norm": LINF, "points": 10_000}
    apart = masking_checks.minimum_norm_below_fixed_budget({"autoattack": aa, "fmn": fmn}, n=10_000)
    assert not apart["flagged"] and not apart["same_points"]
    assert apart["threshold"] == pytest.approx(2 * 100 * (0.47 * 0.53 / 128) ** 0.5)
    wider = masking_checks.minimum_norm_below_fixed_budget({"autoattack": aa, "fmn": dict(fmn, curve=_fmn(37.0)[
        "curve"])}, n=10_000)
    assert wider["flagged"] and "standard errors of 128" in wider["detail"]
    same = dict(_fmn(40.0), points=[0, 500], n_points=500)
    paired = masking_checks.minimum_norm_below_fixed_budget({"pgd50": {"robust_acc": 47.0, "eps": EPS, "norm": LINF},
                                                             "fmn": same}, n=500)
    assert paired["flagged"] and paired["same_points"] and paired["threshold"] == masking_checks.MIN_NORM_GAP_PP


# ------------------------------------------------------------------------------------------ test.py, tables, plots
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits checkpoint (2 natural epochs) and its test.py result with natural, pgd10 and fmn."""
    import train

    with single_thread():
        root = str(tmp_path_factory.mktemp("runs"))
        common = ["--dataset", "digits", "--trainer", "base", "--result-dir", root, "--no-progress", "--exp-mode",
                  "pretrain"]
        assert train.main(common + ["--epochs", "2"]) == 0
        copy = os.path.join(root, "copies", "result.json")
        assert test_py.main(common + ["--attacks", "natural,pgd10,fmn", "--n-examples", "90", "--results-file",
                                      copy]) == 0
    run = os.path.join(root, "small_cnn", "digits", "nat", "pretrain")
    return {"root": root, "result": os.path.join(run, "eval", "model_best_standard.json"), "copy": copy}


def test_test_py_writes_the_fmn_entry_distances_and_checks(digits_run):
    with open(digits_run["result"]) as fh:
        result = json.load(fh)
    entry = result["attacks"]["fmn"]
    assert list(result["attacks"]) == ["pgd10", "fmn"]
    assert entry["n_points"] == result["n_examples"] == 90 and entry["steps"] == 100 and entry["tuning"] is None
    assert entry["eps"] == result["epsilon"] and entry["robust_acc"] <= result["natural_acc"]
    path = resolve_distances_file(digits_run["result"], entry)
    assert os.path.dirname(path) == os.path.dirname(digits_run["result"])
    assert read_distances(path)["distances"].shape == (90,)
    assert {"randomised_output", "probability_output", "zero_gradients",
            "minimum_norm_below_fixed_budget"} <= set(result["gradient_masking"]["checks"])
    # --results-file: the copy finds its distances file beside it too.
    with open(digits_run["copy"]) as fh:
        copy = json.load(fh)
    assert read_distances(resolve_distances_file(digits_run["copy"], copy["attacks"]["fmn"]))["distances"].shape == (90,)


def test_tables_tabulate_fmn_accuracy_and_median_distance(digits_run):
    with open(digits_run["result"]) as fh:
        entry = json.load(fh)["attacks"]["fmn"]
    accuracy = make_tables.make_tables([digits_run["root"]], attack="fmn")
    assert f"{entry['robust_acc']:.2f}" in accuracy
    median = make_tables.make_tables([digits_run["root"]], attack="fmn", value="median_distance")
    assert f"{entry['median_distance']:.4g}" in median and "median minimal distance of fmn" in median
    csv_text = make_tables.make_tables([digits_run["root"]], fmt="csv", attack="fmn", value="median_distance")
    assert "fmn median_distance" in csv_text
    with pytest.raises(make_tables.TableError, match="median_distance"):
        make_tables.make_tables([digits_run["root"]], attack="pgd10", value="median_distance")


def test_security_curve_plot_from_distances(digits_run, tmp_path):
    with open(digits_run["result"]) as fh:
        result = json.load(fh)
    xs, ys = plots.fmn_curve(digits_run["result"], result)
    assert xs[0] == 0.0 and xs[-1] == pytest.approx(3 * result["epsilon"]) and len(xs) == plots.FMN_CURVE_POINTS
    assert all(a >= b for a, b in zip(ys, ys[1:])) and ys[0] == pytest.approx(result["natural_acc"])
    output = str(tmp_path / "curve.png")
    assert plots.main(["security-curve", digits_run["result"], digits_run["copy"], "-o", output]) == 0
    assert os.path.getsize(output) > 0
    os.remove(os.path.join(os.path.dirname(digits_run["copy"]), result["attacks"]["fmn"]["distances_file"]))
    assert plots.main(["security-curve", digits_run["copy"], "-o", output]) == 2


# ------------------------------------------------------------------------------------------ the AP preset
def test_ap_preset_end_to_end_states_every_protocol_setting(tmp_path):
    from models import create_model

    fakedata.write_cifar10(tmp_path / "data", n_train=16, n_test=80)
    # An untrained cifar_model: its few correct points have tiny margins, so APGD-CE breaks them all and the later
    # AutoAttack components have nothing left to attack (seconds, not minutes, on 2 cores).
    torch.manual_seed(0)
    model = create_model("cifar_model", num_classes=10, in_channels=3, input_size=32)
    path = str(tmp_path / "cifar_plain.pth.tar")
    torch.save({"state_dict": model.state_dict()}, path)
    assert test_py.main(["--dataset", "CIFAR10", "--data-dir", str(tmp_path / "data"), "--arch", "cifar_model",
                         "--source-net", path, "--attack-preset", "ap", "--fmn-tune", "2", "--no-progress"]) == 0
    with open(tmp_path / "eval" / "cifar_plain_ap.json") as fh:
        result = json.load(fh)
    assert result["preset"] == "ap" and result["epsilon"] == AP_AA_EPS and result["norm"] == LINF
    assert result["n_examples"] == 80 and result["config"]["eval_batch_size"] == 500
    assert list(result["attacks"]) == ["autoattack", "fmn"]
    aa, fmn = result["attacks"]["autoattack"], result["attacks"]["fmn"]
    assert aa["eps"] == AP_AA_EPS and aa["batch_size"] == 500 and aa["components"] == ["apgd-ce", "apgd-t", "fab-t",
                                                                                        "square"]
    assert aa["per_component"]["apgd-ce"]["steps"] == 100 and aa["per_component"]["square"]["queries"] == 5000
    assert fmn["eps"] == pytest.approx(8 / 255) and fmn["steps"] == 200 and fmn["points"] == [64, 80]
    assert fmn["counting"] == FAILURES_ZERO and len(fmn["curve"]) == 1000
    assert fmn["tuning"]["points"] == [0, 64] and fmn["tuning"]["n_configs"] == 2 and fmn["tuning"]["steps"] == 100
    assert fmn["config"]["loss"] == "dlr" and fmn["config"]["optimizer"] == "sgd"

    protocol = result["protocol"]
    assert protocol["autoattack"]["version"] == "standard" and protocol["autoattack"]["eps"] == AP_AA_EPS
    assert protocol["autoattack"]["points"] == [0, 10_000] and protocol["autoattack"]["points_evaluated"] == 80
    assert protocol["autoattack"]["batch_size"] == 500 and protocol["autoattack"]["seed"] == result["seed"]
    hofmn = protocol["hofmn"]
    assert hofmn["threshold_eps"] == pytest.approx(8 / 255) and hofmn["attack"] == {"steps": 200, "points": [64, 80]}
    assert hofmn["tuning"]["trials"] == 2 and hofmn["tuning"]["points"] == [0, 64] and hofmn["tuning"]["steps"] == 100
    assert hofmn["curve"] == {"eps_min": 0.0, "eps_max": 0.15, "points": 1000} and "counting" in hofmn
    assert set(protocol["units"]) == {"clean_accuracy", "robust_accuracy_aa", "robust_accuracy_hofmn"}
    numbers = protocol["numbers"]
    assert numbers["clean_accuracy"] == round(result["natural_acc"], 2)
    assert numbers["robust_accuracy_aa"] == round(aa["robust_acc"], 2)
    assert numbers["robust_accuracy_hofmn"] == pytest.approx(fmn["robust_acc"] / 100) and 0 <= numbers[
        "robust_accuracy_hofmn"] <= 1
    assert len(protocol["deviations"]) == 2  # 80 points instead of [2048, 2176), and 2 trials instead of 32
