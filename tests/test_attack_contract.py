"""The attack contract (trainers/evaluation/registry.py) and the result schema (trainers/evaluation/report.py).

A plug-in attack with an option (tests/toy_attack.py) runs through test.py, which names no attack; every attack's
pre-flight check stops test.py before the clean pass with one line; a suite that fails part-way writes what
finished, marked incomplete, and the same command runs only the rest, ending with the JSON an uninterrupted run
writes; every reader of results refuses a format it does not know.
"""
import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch

import train
from configs.errors import UserError
from data.info import dataset_info
from models import create_model
from scripts import ap_submit, make_tables, plots
from scripts.reproduction import state as plan_state
from tests import toy_attack
from tests.conftest import load_entry_point, single_thread
from trainers.attacks.threat import LINF, ThreatModel
from trainers.evaluation import gradient, suite
from trainers.evaluation.autoattack import AutoAttackOptions
from trainers.evaluation.certified import CertifyOptions
from trainers.evaluation.minimum_norm import FMNOptions
from trainers.evaluation.registry import (ATTACKS, NATURAL, AttackSpec, EvalContext, EvalSettings, NoOptions,
                                          attack_help, attack_options)
from trainers.evaluation.report import INCOMPLETE, RESULT_FORMAT_VERSION, read_result

try:
    import fakedata
except ImportError:  # pragma: no cover
    from tests import fakedata

test_py = load_entry_point("test.py", "harp_test_entry_contract")
pytestmark = pytest.mark.usefixtures("one_thread")

FLAKY = "flaky"       # a whole-set attack that fails while FLAKY_STATE says so
FLAKY_STATE = {"fail": False, "runs": 0}


def _flaky_run(model, make_batches, settings, options, clean):
    FLAKY_STATE["runs"] += 1
    if FLAKY_STATE["fail"]:
        raise RuntimeError("the flaky attack broke down")
    return {"robust_acc": 0.0, "stderr": 0.0, "eps": settings.eps, "norm": settings.norm, "seconds": 0.0}


def _install_flaky():
    if FLAKY not in ATTACKS:
        ATTACKS.add(FLAKY, AttackSpec(FLAKY, "fails on demand (tests)", run=_flaky_run, check=lambda *args: None,
                                      in_all=False))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits pretrain run (natural training, 1 epoch) and test.py's flags for it."""
    root = str(tmp_path_factory.mktemp("contract"))
    common = ["--dataset", "digits", "--trainer", "base", "--result-dir", root, "--no-progress"]
    with single_thread():
        assert train.main(common + ["--exp-mode", "pretrain", "--epochs", "1"]) == 0
    toy_attack.install()
    _install_flaky()
    run = os.path.join(root, "small_cnn", "digits", "nat", "pretrain")
    yield {"flags": common + ["--exp-mode", "pretrain", "--n-examples", "60"],
           "result": os.path.join(run, "eval", "model_best_standard.json"),
           "checkpoint": os.path.join(run, "checkpoint", "model_best.pth.tar")}
    for name in (toy_attack.NAME, FLAKY):  # the toy attacks stay this module's: other tests see the shipped registry
        ATTACKS.remove(name)


@pytest.fixture
def clean_passes(monkeypatch):
    """Counts the suite's clean passes."""
    calls = []
    original = suite.clean_pass

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(suite, "clean_pass", counting)
    return calls


def _errors(capsys):
    """The error lines test.py printed (its log lines go to stderr too)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _load(path):
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------------------- the contract
def test_a_plugin_attack_with_an_option_runs_through_test_py(digits_run):
    assert test_py.main(digits_run["flags"] + ["--attacks", f"natural,pgd10,{toy_attack.NAME}", "--num-steps",
                                               "3"]) == 0
    result = _load(digits_run["result"])
    entry = result["attacks"][toy_attack.NAME]
    assert entry["draws"] == 3 and entry["eps"] == result["epsilon"]
    assert entry["max_perturbation"] <= result["epsilon"] * (1 + 1e-5)
    assert entry["robust_acc"] <= result["natural_acc"]


def test_every_attacks_options_come_from_one_loop_over_the_config(digits_run):
    from configs.cli import resolve_config
    from stage import option_choices

    cfg, _ = resolve_config(digits_run["flags"] + ["--num-steps", "4", "--fmn-steps", "7", "--certify-n", "300",
                                                   "--eval-batch-size", "33"], "test", "test.py",
                            choices=option_choices())
    options = attack_options([NATURAL, "pgd10", "autoattack", "certify", "fmn", toy_attack.NAME], cfg, EvalContext())
    assert set(options) == {"pgd10", "autoattack", "certify", "fmn", toy_attack.NAME}  # natural is no attack
    assert options["pgd10"] == NoOptions() and options[toy_attack.NAME] == toy_attack.NoiseOptions(draws=4)
    assert options["autoattack"] == AutoAttackOptions(batch_size=33)
    assert options["certify"].n == 300 and options["certify"].batch_size == 33
    assert options["fmn"].steps == 7 and options["fmn"].tuning_batches is None  # no data in the context


@pytest.mark.parametrize("dataset,device,expected", [("CIFAR10", "cuda", 1000), ("CIFAR10", "cpu", 77),
                                                     ("imagenet", "cuda", 77), ("digits", "cuda", 1000)])
def test_autoattacks_batch_follows_the_datasets_policy(dataset, device, expected):
    """AutoAttack's batch of survivors: --eval-batch-size, else the dataset's description decides (data/info.py)."""
    from configs.schema import Config

    context = EvalContext(data=SimpleNamespace(info=dataset_info(dataset)), device=torch.device(device))
    cfg = Config(dataset=dataset, test_batch_size=77)
    assert AutoAttackOptions.from_config(cfg, context).batch_size == expected
    assert AutoAttackOptions.from_config(dataclasses.replace(cfg, eval_batch_size=12), context).batch_size == 12
    assert dataset_info("SVHN").balanced_accuracy and not dataset_info(dataset).balanced_accuracy


def test_attacks_help_lists_every_attack_with_its_summary(digits_run, capsys):
    assert test_py.main(["--attacks", "help"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(toy_attack.NAME) and "random points of the eps-ball" in line for line in out)
    assert any(line.startswith("fmn") and "not in 'all'" in line for line in out)
    assert out == attack_help()


def test_every_attack_declares_its_pre_flight_check():
    from trainers.evaluation.registry import attack_names
    assert all(callable(ATTACKS.get(name).check) for name in attack_names())
    with pytest.raises(ValueError, match="pre-flight check"):
        AttackSpec("unchecked", "a whole-set attack without a check", run=_flaky_run)
    settings = EvalSettings(threat=ThreatModel(0.1, 0.025, 0))
    with pytest.raises(UserError, match="--attacks pgd: --num-steps 0: PGD needs at least one step"):
        suite.preflight(torch.nn.Linear(2, 2), ["fgsm", "pgd10", "pgd"], settings)
    with pytest.raises(UserError, match="--attacks pgd10: --step-size 0: PGD needs a positive step size"):
        suite.preflight(torch.nn.Linear(2, 2), ["pgd10"], EvalSettings(threat=ThreatModel(0.1, 0.0, 10)))


def test_a_spec_is_one_kind_of_attack():
    with pytest.raises(ValueError):
        AttackSpec("both", "per batch and whole set", make=gradient._pgd_ce, params=lambda s, o: {},
                   run=_flaky_run)
    with pytest.raises(ValueError):
        AttackSpec("unrecorded", "a per-batch attack without params", make=gradient._pgd_ce)


# ----------------------------------------------------------------------------------------------- pre-flight
def test_a_bad_option_stops_test_py_before_the_clean_pass(digits_run, clean_passes, capsys, tmp_path):
    target = str(tmp_path / "never.json")
    code = test_py.main(digits_run["flags"] + ["--attacks", f"natural,pgd10,{toy_attack.NAME}", "--num-steps", "0",
                                               "--results-file", target])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"test.py: error: --attacks {toy_attack.NAME}: needs at least one draw")
    assert not clean_passes and not os.path.exists(target)


def test_certify_settings_that_cannot_certify_stop_test_py_before_the_clean_pass(digits_run, clean_passes, capsys):
    code = test_py.main(digits_run["flags"] + ["--attacks", "natural,certify", "--certify-n", "5"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1 and "--attacks certify: --certify-n 5 cannot certify any point" in errors[0]
    assert not clean_passes
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="at least 10 draws"):
        suite.preflight(model, ["certify"], EvalSettings(threat=ThreatModel(0.1, 0.025, 10)),
                        {"certify": CertifyOptions(n=9, alpha=0.001)})
    suite.preflight(model, ["certify"], EvalSettings(threat=ThreatModel(0.1, 0.025, 10)),
                    {"certify": CertifyOptions(n=10, alpha=0.001)})
    with pytest.raises(UserError, match="radii"):
        suite.preflight(model, ["certify"], EvalSettings(threat=ThreatModel(0.1, 0.025, 10)),
                        {"certify": CertifyOptions(radii=(-0.5,))})


def test_fmn_tuning_without_tuning_points_is_refused_before_it_runs():
    with pytest.raises(UserError, match="--attacks fmn: FMN tuning"):
        suite.preflight(torch.nn.Linear(2, 2), ["fmn"], EvalSettings(threat=ThreatModel(0.1, 0.025, 10)),
                        {"fmn": FMNOptions(tune=4)}, points=100)


def test_ibp_on_a_vgg_and_the_ap_preset_on_too_few_points_fail_before_the_clean_pass(tmp_path, clean_passes,
                                                                                     capsys):
    fakedata.write_cifar10(tmp_path / "data", n_train=16, n_test=50)
    torch.manual_seed(0)
    path = str(tmp_path / "vgg.pth.tar")
    torch.save({"state_dict": create_model("vgg16_bn", num_classes=10, in_channels=3, input_size=32).state_dict()},
               path)
    cifar = ["--dataset", "CIFAR10", "--data-dir", str(tmp_path / "data"), "--arch", "vgg16_bn", "--source-net", path,
             "--no-progress"]
    assert test_py.main(cifar + ["--attacks", "natural,autoattack,ibp"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("test.py: error: --attacks ibp: ") and "nn.Sequential" in errors[0]
    assert test_py.main(cifar + ["--attack-preset", "ap", "--n-examples", "50"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("test.py: error: --attacks fmn: ") and "50 evaluated" in errors[0]
    assert not clean_passes and not [name for name in os.listdir(tmp_path / "eval") if name.endswith(".json")]


def test_the_bounds_verify_linf_balls_only():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    l2 = EvalSettings(threat=ThreatModel(0.5, 0.125, 10, norm="l2"))
    with pytest.raises(UserError, match="--attacks crown-ibp: the bounds verify Linf balls"):
        suite.preflight(model, ["crown-ibp"], l2)
    with pytest.raises(UserError, match="--attacks sym: the bounds verify Linf balls"):
        suite.preflight(model, ["sym"], l2)
    suite.preflight(model, ["ibp", "sym", "crown-ibp"], EvalSettings(threat=ThreatModel(0.1, 0.025, 10, norm=LINF)))


# ----------------------------------------------------------------------------------------------- incomplete results
def _comparable(result):
    """A result without what differs between two runs of the same evaluation (times, the --results-file in the
    config)."""
    drop = {"seconds", "natural_seconds", "date", "config"}
    out = {k: v for k, v in result.items() if k not in drop}
    out["attacks"] = {n: {k: v for k, v in e.items() if k != "seconds"} for n, e in result["attacks"].items()}
    return out


def test_a_failed_attack_leaves_the_finished_ones_and_a_rerun_runs_only_the_rest(digits_run, monkeypatch, tmp_path):
    flags = digits_run["flags"] + ["--attacks", f"natural,pgd10,fgsm,{FLAKY}"]
    full, copy = str(tmp_path / "full.json"), str(tmp_path / "copy.json")
    FLAKY_STATE.update(fail=False)
    assert test_py.main(flags + ["--results-file", full]) == 0

    FLAKY_STATE.update(fail=True, runs=0)
    with pytest.raises(RuntimeError, match="flaky attack broke down"):
        test_py.main(flags + ["--results-file", copy])
    partial = _load(digits_run["result"])
    assert partial[INCOMPLETE] == {"failed": FLAKY, "error": "RuntimeError: the flaky attack broke down",
                                   "missing": [FLAKY]}
    assert list(partial["attacks"]) == ["fgsm", "pgd10"] and "gradient_masking" not in partial
    assert _load(copy) == partial
    assert not plan_state.test_done(digits_run["result"], digits_run["checkpoint"])
    with pytest.raises(UserError, match="incomplete"):
        read_result(digits_run["result"], complete=True)

    pgd_calls = []
    original = gradient.pgd
    monkeypatch.setattr(gradient, "pgd", lambda *a, **k: pgd_calls.append(1) or original(*a, **k))
    FLAKY_STATE.update(fail=False, runs=0)
    assert test_py.main(flags + ["--results-file", copy]) == 0
    finished = _load(digits_run["result"])
    assert not pgd_calls and FLAKY_STATE["runs"] == 1  # pgd10 and fgsm were kept, only the flaky attack ran
    assert INCOMPLETE not in finished and plan_state.test_done(digits_run["result"], digits_run["checkpoint"])
    assert _comparable(finished) == _comparable(_load(full))


def test_an_incomplete_result_of_other_settings_is_not_resumed(digits_run, monkeypatch):
    flags = digits_run["flags"] + ["--attacks", f"natural,pgd10,{FLAKY}"]
    FLAKY_STATE.update(fail=True)
    with pytest.raises(RuntimeError):
        test_py.main(flags)
    pgd_calls = []
    original = gradient.pgd
    monkeypatch.setattr(gradient, "pgd", lambda *a, **k: pgd_calls.append(1) or original(*a, **k))
    FLAKY_STATE.update(fail=False)
    assert test_py.main(flags + ["--seed", "7"]) == 0
    assert pgd_calls and _load(digits_run["result"])["seed"] == 7


# ----------------------------------------------------------------------------------------------- readers
def test_every_reader_refuses_an_unknown_result_format(digits_run, tmp_path, capsys):
    result = _load(digits_run["result"])
    result["format_version"] = RESULT_FORMAT_VERSION + 1
    folder = tmp_path / "eval"
    folder.mkdir()
    future = str(folder / "model_best_standard.json")
    with open(future, "w") as fh:
        json.dump(result, fh)
    with open(folder / "notes.json", "w") as fh:
        json.dump({"epoch": 3}, fh)  # another JSON file in the tree: not a result, skipped
    expected = f"result format version {RESULT_FORMAT_VERSION + 1}; this toolkit reads version {RESULT_FORMAT_VERSION}"
    for main, argv in ((make_tables.main, [str(tmp_path)]),
                       (plots.main, ["security-curve", future, "-o", str(tmp_path / "c.png")]),
                       (plots.main, ["keep-rates", future, "-o", str(tmp_path / "k.png")])):
        code = main(argv)
        errors = _errors(capsys)
        assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    with pytest.raises(UserError, match=expected):
        ap_submit.load_ap_result(future, digits_run["checkpoint"], explicit=True)
    assert not plan_state.test_done(future, digits_run["checkpoint"])
