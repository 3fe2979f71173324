"""Stage recipes as the one place a mode is defined: LWM as its own mode, the switches that change a recipe, and a
pruning method added as a plug-in (tests/toy_method.py) that runs end to end with resume and evaluation."""
import json
import os

import pytest

import train
from configs.cli import resolve_config
from configs.recipes import BEST_ANY_EPOCH, BEST_ONCE_TARGET_MET, RECIPES, effective_recipe
from tests import toy_method
from tests.conftest import load_entry_point
from utils.run_dir import run_dir, source_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def resolve(*argv, scope="train"):
    return resolve_config(list(argv), scope, "train.py")[0]


def test_lwm_is_its_own_mode_and_the_old_spelling_means_the_same_run():
    lwm = resolve("--exp-mode", "lwm_finetune", "--k", "0.01")
    old = resolve("--exp-mode", "score_finetune", "--scaled-score-init", "--k", "0.01")
    assert old == lwm and lwm.exp_mode == "lwm_finetune" and lwm.scaled_score_init
    assert run_dir(lwm).endswith(os.path.join("digits_weight_010_uni_0.01", "lwm_finetune"))
    assert source_checkpoint(lwm).endswith(os.path.join("pgd", "pretrain", "checkpoint", "model_best.pth.tar"))
    hydra = resolve("--exp-mode", "score_finetune", "--k", "0.01")
    assert hydra.exp_mode == "score_finetune" and run_dir(hydra) != run_dir(lwm)
    assert source_checkpoint(hydra).endswith(os.path.join("score_prune", "checkpoint", "model_best.pth.tar"))


def test_soft_hw_switch_adds_or_removes_the_hardware_loss_with_its_gamma_and_best_rule():
    plain = effective_recipe(RECIPES["harp_prune"], resolve("--exp-mode", "harp_prune", "--k", "0.1"))
    assert plain.regularizers == ("hardware",) and plain.best_when == BEST_ONCE_TARGET_MET
    off = effective_recipe(RECIPES["harp_prune"], resolve("--exp-mode", "harp_prune", "--no-soft-hw", "--k", "0.1"))
    assert off.regularizers == () and off.hooks == () and off.best_when == BEST_ANY_EPOCH
    on = effective_recipe(RECIPES["score_prune"], resolve("--exp-mode", "score_prune", "--soft-hw", "--k", "0.1"))
    assert on.regularizers == ("hardware",) and on.hooks == ("dynamic_gamma",) and on.best_when == BEST_ONCE_TARGET_MET


def test_a_plugin_pruning_method_runs_end_to_end_with_resume(tmp_path, monkeypatch):
    toy_method.install()
    base = ["--dataset", "digits", "--trainer", "base", "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(base + ["--exp-mode", "pretrain", "--epochs", "1"]) == 0
    toy = base + ["--exp-mode", toy_method.NAME, "--k", "0.1", "--epochs", "3"]
    assert train.main(toy + ["--exp-name", "clean"]) == 0

    original_save = train.Run.save

    def crash_after_first_epoch(self, epoch, is_best, finished):
        original_save(self, epoch, is_best, finished)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(toy + ["--exp-name", "crashed"])
    monkeypatch.setattr(train.Run, "save", original_save)
    assert train.main(toy + ["--exp-name", "crashed"]) == 0

    root = os.path.join(str(tmp_path), "small_cnn", "digits", "nat")

    def metrics(name):
        with open(os.path.join(root, name, toy_method.NAME, "metrics.jsonl")) as fh:
            return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in fh]

    clean, crashed = metrics("clean"), metrics("crashed")
    assert crashed == clean and len(clean) == 3
    assert all(abs(r["keep"] - 0.1) < 0.01 for r in clean)  # random masks at the uniform k
    test_py = load_entry_point("test.py", "harp_test_entry")
    results = str(tmp_path / "toy.json")
    assert test_py.main(base + ["--exp-mode", toy_method.NAME, "--k", "0.1", "--exp-name", "clean",
                                "--attacks", "natural,pgd10", "--results-file", results]) == 0
    with open(results) as fh:
        result = json.load(fh)
    assert result["exp_mode"] == toy_method.NAME and abs(result["sparsity"]["global_keep"] - 0.1) < 0.01
    assert result["attacks"]["pgd10"]["robust_acc"] <= result["natural_acc"]
