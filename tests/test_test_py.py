"""test.py end to end on real digits checkpoints written by train.py (one tiny pipeline per module)."""
import json
import os

import pytest
import torch

import train
from pruning.budget import on_target
from tests.conftest import load_entry_point

try:
    import fakedata
except ImportError:  # pragma: no cover
    from tests import fakedata



test_py = load_entry_point("test.py", "harp_test_entry")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pretrain (natural, 2 epochs) -> harp_prune (1 epoch) -> harp_finetune (1 epoch) on digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("runs"))
    common = ["--dataset", "digits", "--trainer", "base", "--result-dir", root, "--no-progress"]
    pruned = common + ["--k", "0.5", "--stg-id", "050_uni"]
    assert train.main(common + ["--exp-mode", "pretrain", "--epochs", "2"]) == 0
    assert train.main(pruned + ["--exp-mode", "harp_prune", "--epochs", "1"]) == 0
    assert train.main(pruned + ["--exp-mode", "harp_finetune", "--epochs", "1"]) == 0
    torch.set_num_threads(threads)
    finetune_dir = os.path.join(root, "small_cnn", "digits", "nat", "digits_weight_050_uni_0.5", "harp_finetune")
    pretrain_dir = os.path.join(root, "small_cnn", "digits", "nat", "pretrain")
    assert os.path.isfile(os.path.join(finetune_dir, "checkpoint", "model_best.pth.tar"))
    return {"root": root, "common": common, "pruned": pruned + ["--exp-mode", "harp_finetune"],
            "finetune_dir": finetune_dir, "pretrain_dir": pretrain_dir}


def run_test_py(argv):
    code = test_py.main(argv)
    return code


def load(path):
    with open(path) as fh:
        return json.load(fh)


def comparable(result):
    """A result without what legitimately differs between two runs."""
    drop = {"seconds", "natural_seconds", "date", "checkpoint", "config"}
    out = {k: v for k, v in result.items() if k not in drop}
    out["attacks"] = {n: {k: v for k, v in e.items() if k != "seconds"} for n, e in result["attacks"].items()}
    for entry in out["attacks"].values():
        if "per_component" in entry:
            entry["per_component"] = {c: {k: v for k, v in p.items() if k != "seconds"}
                                      for c, p in entry["per_component"].items()}
    return out


# ------------------------------------------------------------------------------------------ the seed command
def test_seed_command_evaluates_the_runs_best_checkpoint(runs, capsys):
    code = run_test_py(runs["pruned"] + ["--attacks", "natural,fgsm,pgd10,cw", "--n-examples", "60",
                                         "--epsilons", "0.05,0.1"])
    err = capsys.readouterr().err
    assert code == 0, err
    best = os.path.join(runs["finetune_dir"], "checkpoint", "model_best.pth.tar")
    assert f"loaded checkpoint {best}" in err
    assert "pgd10" in err and "accuracy %" in err  # the human table
    result = load(os.path.join(runs["finetune_dir"], "eval", "model_best_standard.json"))
    for key in ("arch", "dataset", "exp_mode", "k", "prune_reg", "checkpoint", "n_examples", "natural_acc", "attacks",
                "sparsity", "seconds", "versions", "seed", "preset", "stg_id", "alpha", "epoch"):
        assert key in result, key
    assert (result["arch"], result["dataset"], result["exp_mode"], result["k"], result["prune_reg"]) == \
        ("small_cnn", "digits", "harp_finetune", 0.5, "weight")
    assert result["n_examples"] == 60 and result["preset"] == "standard" and result["seed"] == 1234
    assert set(result["attacks"]) == {"fgsm", "pgd10", "cw"}
    for name, entry in result["attacks"].items():
        assert entry["robust_acc"] <= result["natural_acc"], name
        assert entry["eps"] == pytest.approx(0.1) and entry["norm"] == "linf"
        assert {"steps", "step_size", "restarts", "seconds"} <= set(entry)
    assert result["attacks"]["pgd10"]["step_size"] == pytest.approx(0.025)
    assert result["attacks"]["cw"]["steps"] == 20
    sparsity = result["sparsity"]
    assert sparsity["kept"] == sum(v["kept"] for v in sparsity["per_layer"].values())
    assert sparsity["global_keep"] == sparsity["kept"] / sparsity["total"]
    assert on_target(sparsity["global_keep"], 0.5)  # HARP's learned rates: where the CPU's float order takes them
    assert all(0 < v["keep"] <= 1 for v in sparsity["per_layer"].values())
    assert [p["eps"] for p in result["security_curve"]] == [0.05, 0.1]
    assert result["security_curve"][1]["robust_acc"] == result["attacks"]["pgd10"]["robust_acc"]
    assert "torch" in result["versions"] and "torchattacks" in result["versions"]
    # the model's budget record (target and reached keep) travels from its checkpoint into the result
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert result["budget"] == ckpt["budget"] and result["budget"]["target"] == pytest.approx(0.5)
    assert result["budget"]["reached"] == pytest.approx(sparsity["global_keep"])


def test_dense_export_gives_the_same_numbers(runs):
    argv = runs["pruned"] + ["--attacks", "natural,pgd10", "--n-examples", "60"]
    assert run_test_py(argv) == 0
    assert run_test_py(argv + ["--checkpoint", "best_dense"]) == 0
    masked = load(os.path.join(runs["finetune_dir"], "eval", "model_best_standard.json"))
    dense = load(os.path.join(runs["finetune_dir"], "eval", "model_best_dense_standard.json"))
    assert dense["checkpoint_kind"].endswith("(plain weights)") and masked["checkpoint_kind"].endswith("(masked)")
    assert dense["natural_acc"] == masked["natural_acc"]
    assert dense["attacks"]["pgd10"]["robust_acc"] == masked["attacks"]["pgd10"]["robust_acc"]
    assert dense["sparsity"]["kept"] <= masked["sparsity"]["kept"]
    assert dense["sparsity"]["global_keep"] == pytest.approx(masked["sparsity"]["global_keep"], abs=1e-3)


def _original_layout(runs, tmp_path, *, drop_rates=False, wrap=True):
    """Our finetune checkpoint rewritten as the original code saves it: DataParallel prefix, no config."""
    ckpt = torch.load(os.path.join(runs["finetune_dir"], "checkpoint", "model_best.pth.tar"), weights_only=True)
    state = {f"module.{k}": v for k, v in ckpt["state_dict"].items() if not (drop_rates and k.endswith(".k_score"))}
    assert any(k.endswith(".popup_scores") for k in state)
    path = str(tmp_path / ("hydra.pth.tar" if drop_rates else "harp_original.pth.tar"))
    torch.save({"epoch": 7, "state_dict": state, "best_prec1": 41.0} if wrap else state, path)
    return path


def test_original_harp_checkpoint_loads_from_the_command_line_description(runs, tmp_path, capsys):
    argv = runs["pruned"] + ["--attacks", "natural,pgd10", "--n-examples", "60"]
    assert run_test_py(argv) == 0
    ours = load(os.path.join(runs["finetune_dir"], "eval", "model_best_standard.json"))
    path = _original_layout(runs, tmp_path)
    # No --exp-mode: a checkpoint with scores and rates is labelled harp_finetune.
    code = run_test_py(["--dataset", "digits", "--k", "0.5", "--source-net", path, "--attacks", "natural,pgd10",
                        "--n-examples", "60", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"loaded checkpoint {path} (epoch 7): external (masked)" in err
    result = load(str(tmp_path / "eval" / "harp_original_standard.json"))
    assert result["exp_mode"] == "harp_finetune" and result["k"] == 0.5
    assert result["natural_acc"] == ours["natural_acc"]
    assert result["attacks"]["pgd10"]["robust_acc"] == ours["attacks"]["pgd10"]["robust_acc"]
    assert result["sparsity"]["kept"] == ours["sparsity"]["kept"]


def test_bare_state_dict_of_a_dense_model(runs, tmp_path):
    ckpt = torch.load(os.path.join(runs["pretrain_dir"], "checkpoint", "model_best.pth.tar"), weights_only=True)
    path = str(tmp_path / "dense.pt")
    torch.save({f"module.{k}": v for k, v in ckpt["state_dict"].items()}, path)
    assert run_test_py(["--dataset", "digits", "--source-net", path, "--attacks", "natural", "--n-examples", "40",
                        "--no-progress"]) == 0
    result = load(str(tmp_path / "eval" / "dense_standard.json"))
    assert result["exp_mode"] == "pretrain" and result["sparsity"]["global_keep"] == 1.0
    assert result["attacks"] == {}


def test_original_harp_dense_export_with_leftover_rates(runs, tmp_path):
    """The original code's *_dense file keeps k_score keys beside the masked weights: they are ignored."""
    ckpt = torch.load(os.path.join(runs["finetune_dir"], "checkpoint", "model_best.pth.tar"), weights_only=True)
    dense = torch.load(os.path.join(runs["finetune_dir"], "checkpoint", "model_best_dense.pth.tar"), weights_only=True)
    state = dict(dense["state_dict"])
    state.update({k: v for k, v in ckpt["state_dict"].items() if k.endswith(".k_score")})
    path = str(tmp_path / "harp_dense.pth.tar")
    torch.save({"state_dict": state}, path)
    assert run_test_py(["--dataset", "digits", "--exp-mode", "harp_finetune", "--k", "0.5", "--source-net", path,
                        "--attacks", "natural", "--n-examples", "40", "--no-progress"]) == 0
    result = load(str(tmp_path / "eval" / "harp_dense_standard.json"))
    assert result["exp_mode"] == "harp_finetune" and result["checkpoint_kind"] == "external (plain weights)"
    assert on_target(result["sparsity"]["global_keep"], 0.5)


def test_hydra_layout_without_rates_keeps_k_in_every_layer(runs, tmp_path):
    path = _original_layout(runs, tmp_path, drop_rates=True)
    assert run_test_py(["--dataset", "digits", "--k", "0.3", "--source-net", path, "--attacks", "natural",
                        "--n-examples", "20", "--no-progress"]) == 0
    result = load(str(tmp_path / "eval" / "hydra_standard.json"))
    assert result["exp_mode"] == "score_finetune"
    for layer in result["sparsity"]["per_layer"].values():
        assert layer["keep"] == pytest.approx(0.3, abs=2 / layer["total"] + 1e-6)


# ------------------------------------------------------------------------------------------ errors
def test_missing_checkpoint_is_a_one_line_error(runs, capsys):
    code = run_test_py(runs["common"] + ["--exp-mode", "rate_finetune", "--k", "0.2"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("test.py: error: checkpoint ")
    assert "model_best.pth.tar does not exist" in lines[0]
    code = run_test_py(["--source-net", "/nonexistent/x.pth.tar"])
    err = capsys.readouterr().err
    assert code == 2 and "/nonexistent/x.pth.tar" in err and len(err.strip().splitlines()) == 1


def test_unknown_attack_lists_the_valid_names(runs, capsys):
    code = run_test_py(runs["pruned"] + ["--attacks", "pgd10,deepfool"])
    err = capsys.readouterr().err
    assert code == 2 and "deepfool" in err
    for name in ("natural", "fgsm", "pgd10", "pgd20", "pgd50", "cw", "apgd", "autoattack"):
        assert name in err


def test_explicit_flags_that_contradict_the_checkpoint_are_errors(runs, capsys):
    best = os.path.join(runs["finetune_dir"], "checkpoint", "model_best.pth.tar")
    code = run_test_py(["--dataset", "digits", "--arch", "vgg16_bn", "--source-net", best])
    err = capsys.readouterr().err
    assert code == 2 and "trained with arch 'small_cnn'" in err
    code = run_test_py(["--dataset", "digits", "--epsilons", "0.1,abc", "--source-net", best])
    assert code == 2 and "--epsilons" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ AutoAttack, seeds, SVHN
def test_autoattack_end_to_end(runs, tmp_path):
    copy = str(tmp_path / "copy.json")
    code = run_test_py(runs["common"] + ["--exp-mode", "pretrain", "--attacks", "pgd10,autoattack", "--n-examples",
                                         "12", "--autoattack-points", "10", "--results-file", copy])
    assert code == 0
    result = load(os.path.join(runs["pretrain_dir"], "eval", "model_best_standard.json"))
    assert load(copy) == result
    aa = result["attacks"]["autoattack"]
    assert aa["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["per_component"]["apgd-ce"]["steps"] == 100 and aa["per_component"]["square"]["queries"] == 5000
    accs = [aa["per_component"][c]["robust_acc"] for c in aa["components"]]
    assert accs == sorted(accs, reverse=True) and aa["robust_acc"] == accs[-1]
    assert aa["robust_acc"] <= result["attacks"]["pgd10"]["robust_acc"] <= result["natural_acc"]
    assert aa["max_perturbation"] <= 0.1 + 1e-6
    assert aa["points"] == 10 and result["n_examples"] == 12 and result["budget"] is None


def test_same_seed_gives_identical_results(runs, tmp_path):
    argv = runs["pruned"] + ["--attacks", "natural,pgd10,apgd", "--n-examples", "30"]
    assert run_test_py(argv + ["--results-file", str(tmp_path / "a.json")]) == 0
    assert run_test_py(argv + ["--results-file", str(tmp_path / "b.json")]) == 0
    assert comparable(load(str(tmp_path / "a.json"))) == comparable(load(str(tmp_path / "b.json")))


def test_l2_threat_model_uses_eps_over_four(runs):
    assert run_test_py(runs["pruned"] + ["--attacks", "pgd10", "--n-examples", "20", "--distance", "l_2",
                                         "--epsilon", "0.5", "--attack-preset", "original"]) == 0
    result = load(os.path.join(runs["finetune_dir"], "eval", "model_best_original.json"))
    entry = result["attacks"]["pgd10"]
    assert entry["norm"] == "l2" and entry["eps"] == 0.5 and entry["step_size"] == pytest.approx(0.125)
    assert entry["max_perturbation"] <= 0.5 * (1 + 1e-5)


def test_svhn_reports_balanced_accuracy(tmp_path):
    from models import create_model

    fakedata.write_svhn(tmp_path / "data", n_train=8, n_test=24)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3)
    path = str(tmp_path / "svhn_plain.pth.tar")
    torch.save({"state_dict": model.state_dict()}, path)
    assert run_test_py(["--dataset", "SVHN", "--data-dir", str(tmp_path / "data"), "--arch", "small_cnn",
                        "--source-net", path, "--attacks", "natural,fgsm", "--no-progress"]) == 0
    result = load(str(tmp_path / "eval" / "svhn_plain_standard.json"))
    assert result["n_examples"] == 24 and "natural_balanced_acc" in result
    assert "balanced_acc" in result["attacks"]["fgsm"] and result["attacks"]["fgsm"]["eps"] == pytest.approx(0.031)
