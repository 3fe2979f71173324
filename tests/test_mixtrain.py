"""MixTrain (trainers/mixtrain.py): Hydra's schedules, the loss of one epoch rebuilt from its draws, draws that
depend on (seed, epoch) only, the preset, and, as the issue checks it, a digits pretrain with the preset evaluated by
test.py with ibp / sym / crown-ibp side by side, each never above PGD-10 on the same points. Every mode, resume and
per-epoch validation: test_certified_training.py; the symbolic bounds: test_bounds.py.
"""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
from configs.cli import resolve_config
from data import build_data
from models import create_model
from stage import option_choices
from tests.conftest import load_entry_point, single_thread
from trainers.attacks.threat import threat_from_config
from trainers.certify.bounds import SYMBOLIC, worst_case_loss
from trainers.evaluation.validation import validation_options
from trainers.mixtrain import MIXTRAIN_PROBABILITY, MixTrainLoop, epoch_draws, mixtrain_schedule
from utils.run_dir import objective_component

test_py = load_entry_point("test.py", "harp_test_entry_mixtrain")

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = ["--dataset", "digits", "--configs", "configs/hydra-mixtrain.yml", "--no-progress"]
QUICK = PRESET + ["--epsilon", "0.05", "--schedule-length", "2", "--interval-weight", "1"]
PRUNED = ["--k", "0.1", "--stg-id", "010_uni"]


def resolve(*argv):
    return dataclasses.replace(resolve_config(list(argv), "train", "test", choices=option_choices())[0],
                               num_classes=10)


# ----------------------------------------------------------------------------------------------- schedules
def test_schedule_ramps_eps_per_epoch_and_grows_the_weight_after_the_ramp():
    kwargs = dict(eps=0.1, interval_weight=0.1, schedule_length=3, starting_eps=0.01)
    eps = [mixtrain_schedule(e, **kwargs)[0] for e in range(5)]
    assert eps == pytest.approx([0.01, 0.04, 0.07, 0.1, 0.1])          # Hydra: t (eps - start) / L + start, t < L
    weights = [mixtrain_schedule(e, **kwargs)[1] for e in (0, 3, 7, 8, 12, 13, 18)]
    assert weights == pytest.approx([0.1, 0.1, 0.1, 0.25, 0.25, 0.625, 1.5625])  # x2.5 every 5 epochs after it
    assert mixtrain_schedule(200, **kwargs)[1] == 50.0                   # capped
    assert mixtrain_schedule(0, eps=0.1, interval_weight=0.1, schedule_length=0) == (0.1, 0.1)  # prune/finetune
    shifted = dict(kwargs, schedule_start=2)
    assert [mixtrain_schedule(e, **shifted)[0] for e in (1, 2, 3, 5)] == pytest.approx([0.01, 0.01, 0.04, 0.1])


def test_draws_are_a_function_of_seed_and_epoch_only():
    first = [torch.rand(3, generator=epoch_draws(1234, epoch)) for epoch in (0, 1)]
    torch.manual_seed(0)  # the global stream does not enter
    again = torch.rand(3, generator=epoch_draws(1234, 0))
    assert torch.equal(first[0], again) and not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], torch.rand(3, generator=epoch_draws(1235, 0)))


# ----------------------------------------------------------------------------------------------- the loop
def test_one_epoch_is_clean_ce_plus_weighted_symbolic_ce_on_the_drawn_points():
    cfg = resolve(*QUICK, "--mixtrain-k", "3", "--interval-weight", "0.5", "--starting-epsilon", "0.01")
    loop = MixTrainLoop(cfg, threat_from_config(cfg), torch.device("cpu"))
    model = create_model("cifar_model", num_classes=10, in_channels=1, input_size=8)
    batches = list(build_data("digits", data_dir="").test_batches(8, limit=160))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # every step sees the same weights
    stats = loop.train_epoch(model, model, batches, optimizer, epoch=1, num_batches=len(batches),
                             device=torch.device("cpu"), show_progress=False)
    eps, weight = mixtrain_schedule(1, eps=0.05, interval_weight=0.5, schedule_length=2, starting_eps=0.01)
    draws = epoch_draws(cfg.seed, 1)
    losses, symbolic = [], 0
    model.train()
    with torch.no_grad():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            if float(torch.rand((), generator=draws)) < MIXTRAIN_PROBABILITY:
                picks = torch.randint(0, len(y), (3,), generator=draws)
                loss = loss + weight * worst_case_loss(model, x[picks], y[picks], eps=eps, method=SYMBOLIC)[0]
                symbolic += 1
            losses.append(float(loss))
    assert 0 < symbolic < len(batches)  # both kinds of batch occurred
    assert stats["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert (stats["mixtrain_eps"], stats["mixtrain_iw"]) == pytest.approx((eps, weight))
    assert stats["sym_batches"] == pytest.approx(symbolic / len(batches))
    assert 0 <= stats["sym_acc"] <= 100


def test_mixtrain_validates_symbolically_and_names_its_runs():
    cfg = resolve(*PRESET)
    assert validation_options(cfg)["method"] == SYMBOLIC
    assert validation_options(resolve(*PRESET, "--val-method", "ibp"))["method"] == "ibp"
    assert validation_options(resolve("--dataset", "digits", "--trainer", "mixtrain"))["method"] == SYMBOLIC
    assert objective_component(cfg) == "mixtrain"
    assert (cfg.trainer, cfg.mixtrain_k, cfg.interval_weight, cfg.schedule_length, cfg.epsilon) == \
        ("mixtrain", 5, 0.1, 15, 0.007)
    prune = resolve(*PRESET, *PRUNED, "--exp-mode", "score_prune")
    assert (prune.lr, prune.schedule_length) == (1e-5, 0)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """The preset as the issue runs it: pretrain on digits (the digits preset's 20 epochs)."""
    with single_thread():
        root = str(tmp_path_factory.mktemp("mixtrain"))
        common = PRESET + ["--result-dir", root]
        assert train.main(common + ["--exp-mode", "pretrain"]) == 0
    return root, common


def _verified_accuracies(root, common, extra):
    assert test_py.main(common + ["--exp-mode", "pretrain", "--attacks", "natural,pgd10,ibp,sym,crown-ibp"]
                        + extra) == 0
    with open(os.path.join(root, "cifar_model", "digits", "mixtrain", "pretrain", "eval",
                           "model_best_standard.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("extra", [[], ["--epsilon", "0.05"]])
def test_verified_accuracies_never_exceed_pgd10_on_the_same_points(preset_run, extra, caplog):
    """At the preset's training eps (0.007) and at 0.05, where the bounds verify fewer points than PGD spares."""
    root, common = preset_run
    caplog.set_level("INFO")
    result = _verified_accuracies(root, common, extra)
    attacks = result["attacks"]
    eps = 0.05 if extra else 0.007
    for bound in ("ibp", "sym", "crown-ibp"):
        assert attacks[bound]["eps"] == attacks["pgd10"]["eps"] == eps
        assert attacks[bound]["robust_acc"] <= attacks["pgd10"]["robust_acc"] <= result["natural_acc"]
    assert attacks["sym"]["robust_acc"] > 0
    if extra:
        assert attacks["sym"]["robust_acc"] < attacks["pgd10"]["robust_acc"]  # the comparison is not vacuous
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("verified at eps"))
    assert all(f"{name} {attacks[name]['robust_acc']:.2f}%" in line for name in ("ibp", "sym", "crown-ibp"))
