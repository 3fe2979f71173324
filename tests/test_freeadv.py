"""Free-AT (`--trainer freeadv`): the persistent perturbation, and the seed ImageNet commands end to end.

The end-to-end part runs the README's three ImageNet commands (ResNet50, --normalize, freeadv) on a tiny
ImageFolder tree, in process, with only these additions: --epochs 1, --batch-size 2, --image-dim 32,
--data-dir and --result-dir (and, for test.py, --attacks natural,pgd10: AutoAttack's Square/FAB on a ResNet50
would take minutes on a 2-core CPU). One change to the commands themselves: --stg_id 001_uni instead of
010_uni, so that harp_prune starts at its k = 0.01 target. With 010_uni the target cannot be reached in a
CI-sized run: with --epochs 1 the original's cosine schedule gives lr = 0 for the only epoch
(0.5 * (1 + cos(-pi)) = 0), and with 2 epochs on a 2- or 4-image tree (batch 2, so BatchNorm sees two
examples) the rate logits saturate within the first steps, some of them at keep 1 (the cross-entropy gradient of
a rate is the sum over all of a layer's weights). Measured, 2 epochs: keep went from 10 % to 55 % at gamma 0.1,
to 25 % at gamma 30 and to 24 % at gamma 1000; no --gamma reached 1 %.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

import train
from tests.conftest import load_entry_point, read_metrics as metrics
from tests.fakedata import write_imagenet_folder
from trainers.free_at import FreePerturbation, train_one_epoch_free
from utils.checkpoint import load_checkpoint, save_atomic

EPS = 0.05
N_REPEATS = 3


# ----------------------------------------------------------------------------- the perturbation itself
class Recorder(nn.Module):
    """A small BN-free classifier that keeps a copy of every input it sees."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


class Watched(FreePerturbation):
    """FreePerturbation that keeps a copy of its state after every update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history = []

    def step(self, delta, grad):
        super().step(delta, grad)
        self.history.append(self.delta.clone())


def make_batches(sizes, seed=0):
    """Inputs in [0.25, 0.75], so x + delta never reaches the [0, 1] clamp and input - x is the delta."""
    gen = torch.Generator().manual_seed(seed)
    return [(0.25 + 0.5 * torch.rand(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for n in sizes]


class Regularizer:
    """A loss term for the engine (the trainers.regularizers contract), from a function returning (term, value)."""
    name, weight = "hw_loss", 0.5

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()[0]


def run_epoch(model, batches, perturbation, epoch, optimizer=None, hw_loss=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train_one_epoch_free(model, batches, optimizer, perturbation, n_repeats=N_REPEATS, epoch=epoch,
                                num_batches=len(batches), device=torch.device("cpu"),
                                regularizers=[Regularizer(hw_loss)] if hw_loss else [], show_progress=False)


def used_deltas(model, batches):
    """The perturbation each replay actually fed to the model, in order."""
    xs = [x for x, _ in batches for _ in range(N_REPEATS)]
    assert len(model.inputs) == len(xs)
    return [inp - x for inp, x in zip(model.inputs, xs)]


def test_perturbation_steps_by_eps_and_stays_in_the_ball():
    model, pert = Recorder(), Watched(EPS)
    batches = make_batches([4, 4])
    run_epoch(model, batches, pert, epoch=0)
    deltas = used_deltas(model, batches)
    assert torch.equal(deltas[0], torch.zeros_like(deltas[0]))  # a fresh run starts from zero
    first = pert.history[0]  # zero + eps * sign(grad): every entry is -eps, 0 or +eps, and most are +-eps
    at_eps = first.abs() == torch.tensor(EPS)
    assert (at_eps | (first == 0)).all() and at_eps.float().mean() > 0.9
    for state in pert.history:
        assert state.abs().max() <= EPS
    for used in deltas:
        assert used.abs().max() <= EPS + 1e-6
    # the state keeps moving: later replays reach entries that were pushed back inside the ball
    assert any(not torch.equal(a, b) for a, b in zip(pert.history, pert.history[1:]))


def test_perturbation_persists_across_replays_batches_and_epochs():
    model, pert = Recorder(), Watched(EPS)
    batches = make_batches([4, 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_epoch(model, batches, pert, epoch=0, optimizer=optimizer)
    deltas = used_deltas(model, batches)
    # each replay (also the first replay of the next batch) starts where the previous update left off
    for k in range(1, len(deltas)):
        torch.testing.assert_close(deltas[k], pert.history[k - 1], rtol=0, atol=1e-6)
    end_of_epoch_1 = pert.delta.clone()
    assert end_of_epoch_1.abs().sum() > 0

    model.inputs.clear()
    run_epoch(model, batches, pert, epoch=1, optimizer=optimizer)
    # the second epoch starts from the last state of the first (the original HARP code reset it to zero)
    torch.testing.assert_close(model.inputs[0] - batches[0][0], end_of_epoch_1, rtol=0, atol=1e-6)


def test_a_smaller_last_batch_uses_the_leading_rows_and_leaves_the_rest():
    model, pert = Recorder(), Watched(EPS)
    batches = make_batches([4, 2])
    run_epoch(model, batches, pert, epoch=0)
    after_first_batch = pert.history[N_REPEATS - 1]
    deltas = used_deltas(model, batches)
    torch.testing.assert_close(deltas[N_REPEATS], after_first_batch[:2], rtol=0, atol=1e-6)
    assert pert.delta.shape[0] == 4
    assert torch.equal(pert.delta[2:], after_first_batch[2:])


def test_every_replay_is_an_optimizer_step_with_the_hardware_loss():
    model, pert = Recorder(), FreePerturbation(EPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps, hw_calls = [], []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))

    def hw_loss():
        hw_calls.append(1)
        w = model.net[0].weight
        return w.abs().mean(), w.abs().mean().detach()

    stats = run_epoch(model, make_batches([4, 4, 4]), pert, epoch=0, optimizer=optimizer, hw_loss=hw_loss)
    assert len(steps) == len(hw_calls) == 3 * N_REPEATS
    assert stats["train_examples"] == 3 * 4 * N_REPEATS and "hw_loss_mean" in stats


def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    model, pert = Recorder(), FreePerturbation(EPS)
    batches = make_batches([4, 4])
    run_epoch(model, batches, pert, epoch=0)
    path = str(tmp_path / "ckpt.pth.tar")
    save_atomic({"free_perturbation": pert.state_dict()}, path)
    state = load_checkpoint(path)["free_perturbation"]  # weights_only=True, as train.py resumes
    restored = FreePerturbation(EPS)
    restored.load_state_dict(state, torch.device("cpu"))
    assert torch.equal(restored.delta, pert.delta) and restored.delta.data_ptr() != pert.delta.data_ptr()

    # a resumed epoch starts from the restored state
    model.inputs.clear()
    run_epoch(model, batches, restored, epoch=1)
    torch.testing.assert_close(model.inputs[0] - batches[0][0], pert.delta, rtol=0, atol=1e-6)

    empty = FreePerturbation(EPS)
    assert empty.state_dict() == {"delta": None}
    empty.load_state_dict({"delta": None}, torch.device("cpu"))
    assert empty.delta is None


# ----------------------------------------------------------------------------- the seed ImageNet commands
SEED_PRUNE = ["--arch", "ResNet50", "--dataset", "imagenet", "--normalize", "--exp-mode", "harp_prune", "--k", "0.01",
              "--prune_reg", "weight", "--stg_id", "010_uni", "--trainer", "freeadv", "--gamma", "0.1", "--epochs", "5"]
SEED_FINETUNE = ["--arch", "ResNet50", "--dataset", "imagenet", "--normalize", "--exp-mode", "harp_finetune", "--k",
                 "0.01", "--prune_reg", "weight", "--stg_id", "010_uni", "--trainer", "freeadv", "--epochs", "25"]
SEED_TEST = ["--arch", "ResNet50", "--dataset", "imagenet", "--normalize", "--exp-mode", "harp_finetune", "--k", "0.01",
             "--prune_reg", "weight", "--stg_id", "010_uni", "--trainer", "freeadv"]
PRETRAIN = ["--arch", "ResNet50", "--dataset", "imagenet", "--normalize", "--exp-mode", "pretrain", "--trainer",
            "freeadv", "--epochs", "1"]
STG = "001_uni"  # see the module docstring


def shrink(argv, data_dir, result_dir, training=True):
    argv = list(argv)
    argv[argv.index("--stg_id") + 1] = STG
    if training:
        argv[argv.index("--epochs") + 1] = "1"
        argv += ["--batch-size", "2"]
    return argv + ["--image-dim", "32", "--data-dir", data_dir, "--result-dir", result_dir]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data_dir = write_imagenet_folder(str(root / "data"), n_classes=2, n_train_per_class=1, n_val_per_class=1, size=40)
    result_dir = str(root / "results")
    experiment = os.path.join(result_dir, "ResNet50", "imagenet", "normalize", "freeadv")
    assert train.main(PRETRAIN + ["--batch-size", "2", "--image-dim", "32", "--data-dir", data_dir,
                                  "--result-dir", result_dir]) == 0
    assert train.main(shrink(SEED_PRUNE, data_dir, result_dir)) == 0
    assert train.main(shrink(SEED_FINETUNE, data_dir, result_dir)) == 0
    pruned = os.path.join(experiment, f"imagenet_weight_{STG}_0.01")
    return {"data_dir": data_dir, "result_dir": result_dir, "pretrain": os.path.join(experiment, "pretrain"),
            "prune": os.path.join(pruned, "harp_prune"), "finetune": os.path.join(pruned, "harp_finetune")}


def test_imagenet_prune_stage_reaches_k_with_the_free_trainer(imagenet):
    (record,) = metrics(imagenet["prune"])
    assert record["target_met"] and record["is_best"]
    assert abs(record["keep"] - 0.01) < 1e-3 and record["gamma"] == pytest.approx(0.1)
    best = load_checkpoint(os.path.join(imagenet["prune"], "checkpoint", "model_best.pth.tar"))
    cfg = best["config"]
    assert (cfg["trainer"], cfg["n_repeats"], cfg["epsilon"], cfg["normalize"]) == ("freeadv", 4, 0.0156, True)
    assert best["arch"] == "ResNet50" and any(k.endswith("popup_scores") for k in best["state_dict"])
    # Free-AT's perturbation is checkpointed: one batch of 2 RGB 32x32 images, inside the eps ball
    delta = best["free_perturbation"]["delta"]
    assert tuple(delta.shape) == (2, 3, 32, 32) and delta.abs().max() <= cfg["epsilon"] and delta.abs().sum() > 0
    # every replay is an example seen: 2 images x 4 replays
    assert record["train_examples"] == 2 * 4


def test_imagenet_finetune_stage_chains_from_the_prune_run_and_exports_dense(imagenet):
    (record,) = metrics(imagenet["finetune"])
    assert {"train_loss", "natural_acc", "robust_acc", "keep"} <= set(record)
    assert abs(record["keep"] - 0.01) < 1e-3
    with open(os.path.join(imagenet["finetune"], "train.log")) as fh:
        log = fh.read()
    assert os.path.join(imagenet["prune"], "checkpoint", "model_best.pth.tar") in log
    dense = load_checkpoint(os.path.join(imagenet["finetune"], "checkpoint", "model_best_dense.pth.tar"))
    assert not any(k.endswith(("popup_scores", "k_score")) for k in dense["state_dict"])  # preset save_dense: true


def test_imagenet_seed_test_command_evaluates_the_finetuned_run(imagenet, tmp_path):
    test_py = load_entry_point("test.py", "harp_test_entry")
    results_file = str(tmp_path / "result.json")
    argv = shrink(SEED_TEST, imagenet["data_dir"], imagenet["result_dir"], training=False)
    assert test_py.main(argv + ["--attacks", "natural,pgd10", "--results-file", results_file]) == 0
    with open(results_file) as fh:
        result = json.load(fh)
    assert (result["arch"], result["dataset"], result["exp_mode"], result["k"]) == ("ResNet50", "imagenet",
                                                                                   "harp_finetune", 0.01)
    assert result["n_examples"] == 2 and "pgd10" in result["attacks"]
    assert imagenet["finetune"] in result["checkpoint"]
    assert result["attacks"]["pgd10"]["eps"] == pytest.approx(0.0156)
    assert abs(result["sparsity"]["global_keep"] - 0.01) < 1e-3
