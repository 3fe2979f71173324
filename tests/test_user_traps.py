"""What a first-time user trips over: Ctrl-C, reruns of the quick start, --help, a too-small channel k."""
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train
from configs.cli import resolve_config
from data import dataset_info
from stage import build_model, inspect_masked
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_ctrl_c_prints_one_line_and_the_rerun_resumes(tmp_path):
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "digits", "--exp-mode", "pretrain",
            "--epochs", "3", "--data-fraction", "0.3", "--result-dir", str(tmp_path), "--no-progress"]
    # Ctrl-C reaches train.py as from a terminal even when this suite runs in the background (`cmd &` starts it with
    # SIGINT ignored, and a child inherits that).
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = os.path.join(str(tmp_path), "small_cnn", "digits", "pgd", "pretrain", "checkpoint", "checkpoint.pth.tar")
    while not os.path.exists(first) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert re.fullmatch(r"train\.py: interrupted after epoch [12]; rerun the same command to resume",
                        err.strip().splitlines()[-1]), err
    rerun = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr


def test_skip_finished_leaves_a_finished_run_alone_and_trains_a_missing_one(tmp_path, capsys):
    argv = ["--dataset", "digits", "--trainer", "base", "--epochs", "2", "--result-dir", str(tmp_path), "--no-progress",
            "--skip-finished"]
    assert train.main(argv) == 0  # nothing there yet: it trains
    last = os.path.join(str(tmp_path), "small_cnn", "digits", "nat", "pretrain", "checkpoint", "checkpoint.pth.tar")
    before = os.path.getmtime(last)
    capsys.readouterr()
    assert train.main(argv) == 0
    assert "skipped (--skip-finished)" in capsys.readouterr().err and os.path.getmtime(last) == before
    assert train.main(argv + ["--lr", "0.05"]) == 2  # other settings: still refused, never skipped silently


def test_quickstart_reruns_through_skip_finished(tmp_path):
    """Every train.py command of the quick start carries --skip-finished, so a rerun trains only what is missing
    (and resumes an interrupted stage); a stand-in python records the commands."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {log}\n")
    fake.chmod(0o755)
    env = dict(ENV, PYTHON=str(fake), RESULT_DIR=str(tmp_path / "r"))
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    trains = [c for c in calls if c.startswith("train.py")]
    assert len(trains) == 6 and all("--skip-finished" in c for c in trains)
    assert sum("--exp-mode lwm_finetune" in c for c in trains) == 1
    assert [c.split("--exp-mode ")[1].split()[0] for c in calls if c.startswith("test.py")] == [
        "pretrain", "harp_finetune", "score_finetune", "lwm_finetune"]


def test_help_shows_what_the_dataset_preset_and_mode_set(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--dataset", "digits", "--exp-mode", "harp_prune", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100) [here: 10 from configs/config-digits.yml per_mode.prune]" in text
    assert "[here: 0.05 from configs/config-digits.yml per_mode.prune]" in text  # gamma


def test_a_channel_k_that_leaves_fewer_channels_than_classes_warns(caplog):
    cfg, _ = resolve_config(["--dataset", "digits", "--exp-mode", "harp_prune", "--k", "0.01", "--prune_reg",
                             "channel", "--num-classes", "10"], "train", "train.py")
    info = dataset_info("digits")
    model = build_model(cfg, info, "cpu", masked=True)
    with caplog.at_level(logging.WARNING):
        inspect_masked(cfg, model, info, "cpu")
    assert "keeps fewer input channels than the 10 classes" in caplog.text and "k^2" in caplog.text
    caplog.clear()
    cfg, _ = resolve_config(["--dataset", "digits", "--exp-mode", "harp_prune", "--k", "0.5", "--prune_reg",
                             "channel", "--num-classes", "10"], "train", "train.py")
    with caplog.at_level(logging.WARNING):
        inspect_masked(cfg, build_model(cfg, info, "cpu", masked=True), info, "cpu")
    assert "fewer input channels" not in caplog.text


def test_the_image_channels_of_the_first_conv_are_no_channel_bottleneck(caplog):
    """RGB input has 3 < 10 channels whatever k keeps of them: k = 0.5 (the paper's setting) must not warn."""
    cfg, _ = resolve_config(["--dataset", "CIFAR10", "--arch", "small_cnn", "--exp-mode", "harp_prune", "--k", "0.5",
                             "--prune_reg", "channel", "--num-classes", "10"], "train", "train.py")
    info = dataset_info("CIFAR10")
    with caplog.at_level(logging.WARNING):
        inspect_masked(cfg, build_model(cfg, info, "cpu", masked=True), info, "cpu")
    assert "fewer input channels" not in caplog.text


def test_a_run_that_never_reached_its_target_is_not_finished_for_reruns(tmp_path):
    """A prune run whose hardware target was never met ends without model_best: --skip-finished and reproduce.py
    must not treat it as done (its finetune would have nothing to start from)."""
    from configs.schema import config_to_dict
    from utils.checkpoint import save_atomic
    from utils.run_dir import checkpoint_path, finished_with_same_settings

    cfg, _ = resolve_config(["--dataset", "digits", "--exp-mode", "harp_prune", "--k", "0.01"], "train", "train.py")
    os.makedirs(os.path.join(str(tmp_path), "checkpoint"))
    save_atomic({"finished": True, "config": config_to_dict(cfg)}, checkpoint_path(str(tmp_path), "last"))
    assert not finished_with_same_settings(cfg, str(tmp_path))
    save_atomic({"state_dict": {}}, checkpoint_path(str(tmp_path), "best"))
    assert finished_with_same_settings(cfg, str(tmp_path))
