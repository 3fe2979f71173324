"""train.py as a user runs it: the seed commands, the run layout, resume, refusal to overwrite, bad input."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from tests.fakedata import write_cifar10
from utils.checkpoint import load_checkpoint

from tests.conftest import ROOT, read_metrics as metrics
SEED_PRETRAIN = ["--arch", "vgg16_bn", "--dataset", "CIFAR10", "--exp-mode", "pretrain", "--adv_loss", "pgd", "--epochs", "100"]


def small(argv, data_dir, result_dir, epochs=1):
    """A seed command with only the allowed additions: epochs, batch size, data fraction, data/result dirs."""
    argv = list(argv)
    argv[argv.index("--epochs") + 1] = str(epochs)
    return argv + ["--batch-size", "16", "--data-fraction", "0.5", "--data-dir", data_dir, "--result-dir", result_dir,
                   "--no-progress"]


def snapshot(directory):
    """Content hashes of every file under `directory`."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def comparable(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    data_dir = write_cifar10(str(root / "data"), n_train=32, n_test=16)
    result_dir = str(root / "results")
    assert train.main(small(SEED_PRETRAIN, data_dir, result_dir)) == 0
    return data_dir, result_dir


def test_seed_pretrain_command_leaves_best_checkpoint_and_metrics(cifar):
    _, result_dir = cifar
    run_dir = os.path.join(result_dir, "vgg16_bn", "CIFAR10", "pgd", "pretrain")
    best = load_checkpoint(os.path.join(run_dir, "checkpoint", "model_best.pth.tar"))
    assert best["arch"] == "vgg16_bn" and best["epoch"] == 1 and best["config"]["epsilon"] == 0.031
    assert {"state_dict", "optimizer", "best_prec1", "rng", "format_version"} <= set(best)
    (record,) = metrics(run_dir)
    assert {"epoch", "lr", "train_loss", "natural_acc", "robust_acc"} <= set(record)
    assert record["robust_acc"] <= record["natural_acc"]
    assert os.path.exists(os.path.join(run_dir, "config.yaml")) and os.path.exists(os.path.join(run_dir, "train.log"))


def test_rerunning_a_finished_run_refuses_and_changes_nothing(cifar, capsys):
    data_dir, result_dir = cifar
    before = snapshot(result_dir)
    assert train.main(small(SEED_PRETRAIN, data_dir, result_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run" in err[0] and "--overwrite" in err[0]
    assert snapshot(result_dir) == before


@pytest.mark.parametrize("argv,message", [
    (["--arch", "vgg17"], "unknown architecture 'vgg17'"),
    (["--dataset", "CIFAR11"], "bad value 'CIFAR11' for dataset"),
    (["--exp-mode", "harp_pruning"], "bad value 'harp_pruning' for exp_mode"),
    (["--epochs", "-3"], "epochs must be >= 1"),
    (["--k", "0"], "k must be in (0, 1]"),
    (["--k", "1.01"], "k must be in (0, 1]"),
    (["--data-dir", "/nonexistent/place"], "/nonexistent/place"),
    (["--exp-mode", "harp_finetune", "--k", "0.5"], "run the harp_prune stage first"),
])
def test_bad_input_is_a_one_line_error_and_leaves_results_untouched(cifar, capsys, argv, message):
    data_dir, result_dir = cifar
    base = ["--arch", "vgg16_bn", "--dataset", "CIFAR10", "--epochs", "1", "--data-dir", data_dir,
            "--result-dir", result_dir, "--no-progress", "--exp-name", "bad"]
    before = snapshot(result_dir)
    assert train.main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert snapshot(result_dir) == before


def test_unreadable_and_mismatched_checkpoints_are_errors(cifar, capsys, tmp_path):
    data_dir, result_dir = cifar
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    vgg_best = os.path.join(result_dir, "vgg16_bn", "CIFAR10", "pgd", "pretrain", "checkpoint", "model_best.pth.tar")
    bare = tmp_path / "bare.pth.tar"
    torch.save({"state_dict": {"features.0.weight": torch.zeros(3, 3)}}, bare)
    cases = [(["--arch", "vgg16_bn", "--source-net", str(garbage)], "cannot read checkpoint"),
             (["--arch", "resnet18", "--source-net", vgg_best], "was trained with arch vgg16_bn, not resnet18"),
             (["--arch", "vgg16_bn", "--source-net", str(bare)], "does not fit this model")]
    for argv, message in cases:
        before = snapshot(result_dir)
        code = train.main(argv + ["--dataset", "CIFAR10", "--exp-mode", "harp_prune", "--k", "0.5", "--epochs", "1",
                                  "--data-dir", data_dir, "--result-dir", str(tmp_path / "r"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert snapshot(result_dir) == before


def _digits_cmd(result_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "digits", "--exp-mode", "pretrain",
            "--epochs", "3", "--result-dir", result_dir, "--no-progress", *extra]


def test_sigkill_mid_epoch_then_rerun_resumes_to_the_same_result(tmp_path):
    result_dir = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_digits_cmd(result_dir, "--exp-name", "clean"), check=True, env=env, capture_output=True)
    killed_dir = os.path.join(result_dir, "small_cnn", "digits", "pgd", "killed")
    proc = subprocess.Popen(_digits_cmd(result_dir, "--exp-name", "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = os.path.join(killed_dir, "checkpoint", "checkpoint.pth.tar")
    while not os.path.exists(first) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(killed_dir)) == 1
    rerun = subprocess.run(_digits_cmd(result_dir, "--exp-name", "killed"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    clean = metrics(os.path.join(result_dir, "small_cnn", "digits", "pgd", "clean"))
    assert comparable(metrics(killed_dir)) == comparable(clean)


def test_interrupted_prune_run_resumes_its_gamma_and_best_state(tmp_path, monkeypatch):
    base = ["--dataset", "digits", "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(base + ["--exp-mode", "pretrain", "--epochs", "2"]) == 0
    prune = base + ["--exp-mode", "harp_prune", "--k", "0.05", "--gamma", "0.1", "--epochs", "4"]
    assert train.main(prune + ["--exp-name", "clean"]) == 0

    original_save = train.Run.save

    def crash_after_second_epoch(self, epoch, is_best, finished):
        original_save(self, epoch, is_best, finished)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(prune + ["--exp-name", "crashed"])
    monkeypatch.setattr(train.Run, "save", original_save)
    assert train.main(prune + ["--exp-name", "crashed"]) == 0
    root = os.path.join(str(tmp_path), "small_cnn", "digits", "pgd")
    clean, crashed = metrics(os.path.join(root, "clean", "harp_prune")), metrics(os.path.join(root, "crashed", "harp_prune"))
    assert [r["gamma"] for r in crashed] == [r["gamma"] for r in clean]
    assert comparable(crashed) == comparable(clean)


def test_unfinished_run_with_other_settings_is_not_resumed(tmp_path, capsys, monkeypatch):
    base = ["--dataset", "digits", "--result-dir", str(tmp_path), "--no-progress", "--exp-mode", "pretrain"]

    original_save = train.Run.save

    def save_then_crash(self, epoch, is_best, finished):
        original_save(self, epoch, is_best, finished)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(base + ["--epochs", "3"])
    monkeypatch.setattr(train.Run, "save", original_save)
    assert train.main(base + ["--epochs", "3", "--lr", "0.05"]) == 2
    assert "other settings (lr: 0.1 -> 0.05)" in capsys.readouterr().err


def test_original_harp_checkpoint_layout_loads_for_finetune_and_evaluation(tmp_path, capsys):
    base = ["--dataset", "digits", "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(base + ["--exp-mode", "pretrain", "--epochs", "1"]) == 0
    assert train.main(base + ["--exp-mode", "score_prune", "--k", "0.1", "--epochs", "1"]) == 0
    ours = load_checkpoint(os.path.join(str(tmp_path), "small_cnn", "digits", "pgd", "digits_weight_010_uni_0.1",
                                        "score_prune", "checkpoint", "model_best.pth.tar"))
    # The original's layout: DataParallel prefix, popup_scores/k_score, best_prec1 as a tensor, no config.
    original = {"epoch": 1, "arch": "small_cnn", "best_prec1": torch.tensor(50.0), "optimizer": {},
                "state_dict": {"module." + k: v for k, v in ours["state_dict"].items()}}
    path = tmp_path / "harp_original.pth.tar"
    torch.save(original, path)
    assert train.main(base + ["--exp-mode", "score_finetune", "--k", "0.1", "--epochs", "1", "--evaluate",
                              "--source-net", str(path)]) == 0
    assert "natural_acc" in capsys.readouterr().err
    assert train.main(base + ["--exp-mode", "score_finetune", "--k", "0.1", "--epochs", "1", "--source-net", str(path),
                              "--exp-name", "from_original"]) == 0
    done = load_checkpoint(os.path.join(str(tmp_path), "small_cnn", "digits", "pgd", "from_original", "score_finetune",
                                        "checkpoint", "checkpoint.pth.tar"))
    assert done["sparsity"]["global_keep"] == pytest.approx(0.1, abs=0.002)  # score modes honour --k (the fix)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_schedule = train.lr_at_epoch
    monkeypatch.setattr(train, "lr_at_epoch", lambda epoch, **kw: float("nan") if epoch >= 1 else real_schedule(epoch, **kw))
    argv = ["--dataset", "digits", "--exp-mode", "pretrain", "--epochs", "3", "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "training loss became nan in epoch 2" in err[-1] and "last good checkpoint is kept" in err[-1]
    run_dir = os.path.join(str(tmp_path), "small_cnn", "digits", "pgd", "pretrain")
    last = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))
    assert last["epoch"] == 1 and not last["finished"] and len(metrics(run_dir)) == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
