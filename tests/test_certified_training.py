"""Hydra's certified objectives wired into the toolkit (trainers/certified_training.py, trainers/mixtrain.py,
trainers/evaluation/certified.py): --trainer smooth, crown-ibp and mixtrain in every stage with their own
validation, resume and run layout; test.py's certify / ibp / crown-ibp entries; certified accuracy in the tables.
The maths of smoothing and of the bounds is tested in test_smoothing.py and test_bounds.py, MixTrain's loss and
preset in test_mixtrain.py; here everything runs on digits with Hydra's cifar_model (8x8 inputs), which a CPU
thread classifies at about 200,000 images per second.
"""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
from configs.cli import resolve_config
from configs.errors import UserError
from data import build_data, dataset_info
from pruning.budget import on_target
from models import create_model
from scripts import make_tables
from stage import build_model, option_choices
from tests.conftest import load_entry_point, single_thread, read_metrics as metrics
from trainers.attacks.threat import ThreatModel, threat_from_config
from trainers.certified_training import CrownIBPLoop, SmoothingLoop
from trainers.certify.bounds import SYMBOLIC, crown_ibp_loss, crown_ibp_schedule, verification_sums, verified
from trainers.certify.smoothing import ABSTAIN, smooth_loss, smoothed_validation
from trainers.evaluation.registry import EvalContext, EvalSettings, attack_options
from trainers.evaluation.suite import run_suite
from trainers.evaluation.validation import validate, validation_options
from trainers.training import TRAINERS
from utils.run_dir import objective_component

test_py = load_entry_point("test.py", "harp_test_entry_certified")

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["--dataset", "digits", "--arch", "cifar_model", "--no-progress"]
SMOOTH = DIGITS + ["--trainer", "smooth"]
# CROWN-IBP at half the digits preset's eps, so a few epochs verify about half the test points.
CROWN_EVAL = DIGITS + ["--trainer", "crown-ibp", "--epsilon", "0.05"]
CROWN = CROWN_EVAL + ["--optimizer", "adam", "--lr", "0.003", "--wd", "0", "--schedule-length", "3"]
# MixTrain with Hydra's preset at the same eps and a larger weight, pretrained with a 2-epoch ramp (MIXTRAIN_RAMP),
# so a few epochs verify points; prune and finetune keep the preset's full eps from the start.
MIXTRAIN = DIGITS + ["--configs", "configs/hydra-mixtrain.yml", "--epsilon", "0.05", "--interval-weight", "1"]
MIXTRAIN_RAMP = ["--schedule-length", "2"]
PRUNED = ["--k", "0.1", "--stg-id", "010_uni"]  # starts at the target, so the hardware loss is met at once


def resolve(*argv, scope="train"):
    """The resolved Config, with digits' 10 classes (train.py fills them in from the data)."""
    return dataclasses.replace(resolve_config(list(argv), scope, "test", choices=option_choices())[0], num_classes=10)


def digit_batches(n=64, batch=32):
    return list(build_data("digits", data_dir="").test_batches(batch, limit=n))


# ----------------------------------------------------------------------------------------------- models
def test_hydra_models_are_built_for_the_dataset_image_size():
    model = create_model("cifar_model", num_classes=10, in_channels=1, input_size=8)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert create_model("cifar_model", num_classes=10).input_size == 32  # Hydra's size when none is given
    create_model("small_cnn", num_classes=10, input_size=8)  # builders without the parameter ignore it
    cfg = resolve(*DIGITS, "--exp-mode", "harp_prune", *PRUNED)
    masked = build_model(cfg, dataset_info("digits"), torch.device("cpu"), masked=True)
    assert masked(torch.rand(3, 1, 8, 8)).shape == (3, 10)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("argv, method", [
    (["--trainer", "smooth"], "smooth"),
    (["--trainer", "crown-ibp"], "ibp"),
    (["--trainer", "adv"], "adv"),
    (["--trainer", "smooth", "--val-method", "base"], "base"),
    (["--trainer", "smooth", "--val-method", "ibp"], "ibp"),
    (["--trainer", "adv", "--val-method", "smooth"], "smooth"),
])
def test_validation_follows_the_trainer_unless_chosen(argv, method):
    cfg = resolve("--dataset", "digits", "--noise-std", "0.4", *argv)
    options = validation_options(cfg)
    assert options["method"] == method
    assert options["noise_std"] == 0.4 and options["attack_name"] == cfg.attack_eval


def test_validate_runs_the_smoothed_and_the_verified_measures():
    torch.manual_seed(0)
    model = create_model("cifar_model", num_classes=10, in_channels=1, input_size=8)
    batches = digit_batches()
    threat = ThreatModel(eps=0.02, step_size=0.01, steps=2)
    torch.manual_seed(5)
    smoothed = validate(model, batches, attack_name="pgd", threat=threat, method="smooth", noise_std=0.3)
    torch.manual_seed(5)
    assert smoothed == smoothed_validation(model, batches, sigma=0.3)
    verified_sums = validate(model, batches, attack_name="pgd", threat=threat, method="ibp")
    assert verified_sums == verification_sums(model, batches, eps=0.02)
    natural = validate(model, batches, attack_name="pgd", threat=threat, method="base")
    assert "robust_correct" not in natural and natural["natural_correct"] == smoothed["natural_correct"]


# ----------------------------------------------------------------------------------------------- the loops
def one_batch_epoch(loop, model, batches, epoch=0):
    """One epoch at lr 0, so every step sees the same weights; returns the epoch's stats."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return loop.train_epoch(model, model, batches, optimizer, epoch=epoch, num_batches=len(batches),
                            device=torch.device("cpu"), show_progress=False)


def test_smoothing_loop_trains_hydras_loss_with_the_configured_sigma_and_beta():
    cfg = resolve(*SMOOTH, "--noise-std", "0.4", "--beta", "2")
    model = create_model("cifar_model", num_classes=10, in_channels=1, input_size=8)
    batches = digit_batches(n=32, batch=32)
    loop = SmoothingLoop(cfg, threat_from_config(cfg), torch.device("cpu"))
    torch.manual_seed(3)
    stats = one_batch_epoch(loop, model, batches)
    torch.manual_seed(3)
    model.train()
    expected, _ = smooth_loss(model, *batches[0], sigma=0.4, beta=2.0)
    assert stats["train_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    gaussian = SmoothingLoop(resolve(*SMOOTH, "--smooth-loss", "gaussian"), threat_from_config(cfg), "cpu")
    torch.manual_seed(3)
    noisy = one_batch_epoch(gaussian, model, batches)
    torch.manual_seed(3)
    x, y = batches[0]
    with torch.no_grad():
        expected = F.cross_entropy(model(x + 0.25 * torch.randn_like(x)), y)
    assert noisy["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_crown_ibp_loop_ramps_eps_per_step():
    cfg = resolve(*CROWN, "--schedule-length", "3", "--starting-epsilon", "0.01")
    model = create_model("cifar_model", num_classes=10, in_channels=1, input_size=8)
    batches = digit_batches(n=96, batch=32)
    loop = CrownIBPLoop(cfg, threat_from_config(cfg), torch.device("cpu"))
    stats = one_batch_epoch(loop, model, batches, epoch=1)
    schedule = [crown_ibp_schedule(1, step, steps_per_epoch=3, eps=0.05, schedule_length=3, starting_eps=0.01)
                for step in range(3)]
    assert schedule[0][0] < schedule[1][0] < schedule[2][0] < 0.05  # still ramping in epoch 1 of 3
    model.train()
    with torch.no_grad():
        losses = [float(crown_ibp_loss(model, x, y, eps=eps, beta=beta)[0])
                  for (x, y), (eps, beta) in zip(batches, schedule)]
    assert stats["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert (stats["crown_eps"], stats["crown_beta"]) == pytest.approx(schedule[-1])


@pytest.mark.parametrize("trainer, argv", [("crown-ibp", CROWN), ("mixtrain", MIXTRAIN)])
def test_crown_ibp_refuses_another_architecture_before_writing_anything(trainer, argv, tmp_path, capsys):
    command = ["--dataset", "digits", "--trainer", trainer, "--exp-mode", "pretrain", "--epochs", "1",
               "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nn.Sequential" in err and "cifar_model" in err
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="Linf"):
        TRAINERS.get(trainer)(resolve(*argv), threat_from_config(resolve(*argv)).with_(norm="l2"), "cpu")


def test_run_layout_names_the_certified_objectives():
    assert objective_component(resolve(*SMOOTH)) == "smooth"
    assert objective_component(resolve(*SMOOTH, "--smooth-loss", "gaussian")) == "gaussian"
    assert objective_component(resolve(*CROWN)) == "crown-ibp"
    assert objective_component(resolve(*MIXTRAIN)) == "mixtrain"
    assert objective_component(resolve("--dataset", "digits")) == "pgd"


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smooth_runs(tmp_path_factory):
    """Smoothing at sigma 0.25: pretrain (8 epochs) -> harp_prune k = 0.1 -> harp_finetune on digits."""
    with single_thread():
        root = str(tmp_path_factory.mktemp("smooth"))
        common = SMOOTH + ["--result-dir", root]
        assert train.main(common + ["--exp-mode", "pretrain", "--epochs", "8"]) == 0
        assert train.main(common + PRUNED + ["--exp-mode", "harp_prune", "--epochs", "2", "--gamma", "1"]) == 0
        assert train.main(common + PRUNED + ["--exp-mode", "harp_finetune", "--epochs", "2"]) == 0
    return root, common, common


@pytest.fixture(scope="module")
def crown_runs(tmp_path_factory):
    with single_thread():
        root = str(tmp_path_factory.mktemp("crown"))
        common = CROWN + ["--result-dir", root]
        assert train.main(common + ["--exp-mode", "pretrain", "--epochs", "6"]) == 0
    return root, common, CROWN_EVAL + ["--result-dir", root]


@pytest.fixture(scope="module")
def mixtrain_runs(tmp_path_factory):
    with single_thread():
        root = str(tmp_path_factory.mktemp("mixtrain"))
        common = MIXTRAIN + ["--result-dir", root]
        assert train.main(common + MIXTRAIN_RAMP + ["--exp-mode", "pretrain", "--epochs", "4"]) == 0
    return root, common, common


OBJECTIVES = {"smooth_runs": "smooth", "crown_runs": "crown-ibp", "mixtrain_runs": "mixtrain"}


def assert_percent_of_count(percent, count, n):
    """`percent` is 100 * count / n: the count exactly, the percentage to float32's precision (a mean taken in
    float32 on another machine differs in the 7th digit)."""
    assert round(percent * n / 100) == count and percent == pytest.approx(100.0 * count / n, rel=1e-6)


def test_smoothed_harp_model_is_certified_and_its_certified_accuracy_is_tabled(smooth_runs, capsys):
    root, common, _ = smooth_runs
    run = os.path.join(root, "cifar_model", "digits", "smooth", "digits_weight_010_uni_0.1", "harp_finetune")
    assert test_py.main(common + PRUNED + ["--exp-mode", "harp_finetune", "--attacks", "natural,certify",
                                            "--n-examples", "100", "--certify-n", "200"]) == 0
    with open(os.path.join(run, "eval", "model_best_standard.json")) as fh:
        result = json.load(fh)
    sparsity = result["sparsity"]
    # the learned rates land where the CPU's float order takes them: on target, counted exactly
    assert sparsity["global_keep"] == sparsity["kept"] / sparsity["total"] and on_target(sparsity["global_keep"], 0.1)
    entry = result["attacks"]["certify"]
    curve = entry["certified_accuracy"]
    assert [p["radius"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    accs = [p["acc"] for p in curve]
    assert accs == sorted(accs, reverse=True) and accs[0] == entry["robust_acc"] > 50
    points = entry["per_point"]
    assert len(points["radius"]) == result["n_examples"] == 100
    assert all(r == 0 for r, p in zip(points["radius"], points["prediction"]) if p == ABSTAIN)
    acr = sum(r for r, c in zip(points["radius"], points["correct"]) if c) / 100
    assert entry["average_certified_radius"] == pytest.approx(acr, abs=1e-5)
    assert entry["sigma"] == 0.25 and entry["n0"] == 100 and entry["alpha"] == 0.001
    assert "prediction_acc" in entry

    capsys.readouterr()
    assert make_tables.main([root, "--attack", "certify"]) == 0
    table = capsys.readouterr().out
    harp_row = next(line for line in table.splitlines() if line.startswith("| HARP"))
    assert f"{entry['robust_acc']:.2f}" in harp_row and "robust = certify" in table


def test_certified_accuracy_at_radius_zero_is_close_to_predicts_accuracy(smooth_runs):
    """Cohen et al.: both abstain only near ties, so on a trained model they agree to a few points (here on all
    360 digits test points with N = 500). PREDICT tests only the top two counts while CERTIFY needs pA's lower
    bound above one half, so PREDICT abstains less: measured 1.4 to 3.3 points above CERTIFY at radius 0 over
    6 training seeds x 2 noise seeds on one CPU; the bounds leave room for other CPUs."""
    root, common, _ = smooth_runs
    cfg = resolve(*common, *PRUNED, "--exp-mode", "harp_finetune", "--certify-n", "500", scope="test")
    model = build_model(cfg, dataset_info("digits"), torch.device("cpu"), masked=True)
    path = os.path.join(root, "cifar_model", "digits", "smooth", "digits_weight_010_uni_0.1", "harp_finetune",
                        "checkpoint", "model_best.pth.tar")
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    settings = EvalSettings(threat=threat_from_config(cfg), seed=cfg.seed, show_progress=False)
    source = build_data("digits", data_dir="")
    suite = run_suite(model.eval(), lambda: source.test_batches(512), ["natural", "certify"], settings,
                      options=attack_options(["certify"], cfg, EvalContext()))
    entry = suite["attacks"]["certify"]
    assert entry["n"] == 500 and suite["n"] == 360
    assert -2.0 <= entry["prediction_acc"] - entry["certified_accuracy"][0]["acc"] <= 6.0


@pytest.mark.parametrize("chain", [("score_prune", "score_finetune"), ("rate_prune", "rate_finetune"),
                                   ("lwm_finetune",)])
@pytest.mark.parametrize("runs", sorted(OBJECTIVES))
def test_certified_objectives_run_in_every_mode(runs, chain, request):
    root, common, _ = request.getfixturevalue(runs)
    for mode in chain:
        assert train.main(common + PRUNED + ["--exp-mode", mode, "--epochs", "1"]) == 0
        run = os.path.join(root, "cifar_model", "digits", OBJECTIVES[runs], "digits_weight_010_uni_0.1", mode)
        record = metrics(run)[-1]
        assert on_target(record["keep"], 0.1) and "robust_acc" in record  # rate modes learn their rates
        if runs == "mixtrain_runs":
            assert record["mixtrain_eps"] == 0.05  # prune and finetune: no ramp (the preset's schedule_length 0)


def test_interrupted_certified_runs_resume_to_the_same_result(crown_runs, smooth_runs, mixtrain_runs, monkeypatch):
    """MixTrain too: its coin flips and drawn points are a function of (seed, epoch)."""
    original_save = train.Run.save

    def crash_after_first_epoch(self, epoch, is_best, finished):
        original_save(self, epoch, is_best, finished)
        if epoch == 1:
            raise KeyboardInterrupt

    for (root, common, _), objective, extra in ((crown_runs, "crown-ibp", ["--exp-mode", "pretrain"]),
                                             (smooth_runs, "smooth", PRUNED + ["--exp-mode", "harp_prune",
                                                                               "--gamma", "1"]),
                                             (mixtrain_runs, "mixtrain", PRUNED + ["--exp-mode", "score_prune"])):
        argv = common + extra + ["--epochs", "2"]
        assert train.main(argv + ["--exp-name", "clean"]) == 0
        monkeypatch.setattr(train.Run, "save", crash_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv + ["--exp-name", "crashed"])
        monkeypatch.setattr(train.Run, "save", original_save)
        assert train.main(argv + ["--exp-name", "crashed"]) == 0
        leaf = extra[extra.index("--exp-mode") + 1]
        runs = [os.path.join(root, "cifar_model", "digits", objective, name, *([leaf] if leaf != "pretrain" else []))
                for name in ("clean", "crashed")]
        clean, crashed = ([{k: v for k, v in r.items() if k != "seconds"} for r in metrics(run)] for run in runs)
        assert crashed == clean
        if objective == "mixtrain":
            assert 0 < clean[-1]["sym_batches"] < 1  # both kinds of batch were drawn


def test_verified_accuracy_never_exceeds_pgd_on_the_same_points(crown_runs):
    root, _, evaluate = crown_runs
    assert test_py.main(evaluate + ["--exp-mode", "pretrain", "--attacks", "natural,pgd10,ibp,crown-ibp"]) == 0
    with open(os.path.join(root, "cifar_model", "digits", "crown-ibp", "pretrain", "eval",
                           "model_best_standard.json")) as fh:
        result = json.load(fh)
    attacks = result["attacks"]
    assert 0 < attacks["ibp"]["robust_acc"] <= attacks["pgd10"]["robust_acc"] <= result["natural_acc"]
    assert attacks["crown-ibp"]["robust_acc"] <= attacks["pgd10"]["robust_acc"]
    assert attacks["ibp"]["eps"] == attacks["pgd10"]["eps"] == 0.05


# ----------------------------------------------------------------------------------------------- entry-point wiring
def test_mixtrain_validates_with_symbolic_verified_accuracy(mixtrain_runs):
    """Its deterministic per-epoch measure, at the eps of --epsilon whatever the epoch's eps_t."""
    root, common, _ = mixtrain_runs
    run = os.path.join(root, "cifar_model", "digits", "mixtrain", "pretrain")
    records = metrics(run)
    assert [r["mixtrain_eps"] for r in records] == pytest.approx([0.0, 0.025, 0.05, 0.05])
    cfg = resolve(*common, *MIXTRAIN_RAMP, "--exp-mode", "pretrain")
    model = build_model(cfg, dataset_info("digits"), torch.device("cpu"), masked=False)
    model.load_state_dict(torch.load(os.path.join(run, "checkpoint", "checkpoint.pth.tar"),
                                     weights_only=True)["state_dict"])
    source = build_data("digits", data_dir="")
    flags = torch.cat([verified(model, x, y, eps=0.05, method=SYMBOLIC) for x, y in source.test_batches(512)])
    assert_percent_of_count(records[-1]["robust_acc"], int(flags.sum()), len(flags))


def test_train_validates_with_the_loops_measure_and_test_passes_the_certify_flags(crown_runs, smooth_runs):
    """train.py validates through validation_options (crown-ibp: IBP-verified accuracy, which is deterministic),
    and test.py builds certify's options from its flags (the --certify-* flags reach CERTIFY)."""
    root, common, _ = crown_runs
    run = os.path.join(root, "cifar_model", "digits", "crown-ibp", "pretrain")
    cfg = resolve(*common, "--exp-mode", "pretrain")
    model = build_model(cfg, dataset_info("digits"), torch.device("cpu"), masked=False)
    model.load_state_dict(torch.load(os.path.join(run, "checkpoint", "checkpoint.pth.tar"),
                                     weights_only=True)["state_dict"])
    source = build_data("digits", data_dir="")
    flags = torch.cat([verified(model, x, y, eps=0.05) for x, y in source.test_batches(512)])
    assert_percent_of_count(metrics(run)[-1]["robust_acc"], int(flags.sum()), flags.numel())

    root, _, evaluate = smooth_runs
    results = os.path.join(root, "certify_flags.json")
    assert test_py.main(evaluate + ["--exp-mode", "pretrain", "--attacks", "certify", "--n-examples", "20",
                                  "--certify-n", "50", "--certify-n0", "20", "--certify-alpha", "0.01",
                                  "--noise-std", "0.3", "--results-file", results]) == 0
    with open(results) as fh:
        entry = json.load(fh)["attacks"]["certify"]
    assert (entry["n"], entry["n0"], entry["alpha"], entry["sigma"]) == (50, 20, 0.01, 0.3)
