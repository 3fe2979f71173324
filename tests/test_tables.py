"""scripts/make_tables.py and scripts/plots.py on a synthetic tree of test.py result JSONs."""
import csv
import io
import json
import os

import pytest
import torch

from scripts import make_tables, plots
from trainers.evaluation.report import RESULT_FORMAT_VERSION


def result(arch, exp_mode, keep, natural, robust, *, dataset="CIFAR10", prune_reg="weight", preset="standard",
           attack="autoattack", n=10000, balanced=None, curve=None, layers=None):
    layers = layers or {"features.0": (0.5, 1000), "classifier.0": (keep, 9000)}
    per_layer = {name: {"kept": round(k * t), "total": t, "keep": k, "rate": k} for name, (k, t) in layers.items()}
    kept, total = sum(v["kept"] for v in per_layer.values()), sum(v["total"] for v in per_layer.values())
    out = {"format_version": RESULT_FORMAT_VERSION,
           "arch": arch, "dataset": dataset, "exp_mode": exp_mode, "k": keep, "prune_reg": prune_reg,
           "checkpoint": "x", "n_examples": n, "preset": preset, "epsilon": 0.031, "natural_acc": natural,
           "attacks": {attack: {"robust_acc": robust, "eps": 0.031, "norm": "linf"}},
           # global_keep is the given keep (the table's sparsity column); the per-layer counts are illustrative
           "sparsity": {"global_keep": keep, "kept": kept, "total": total, "per_layer": per_layer},
           "seconds": 1.0, "versions": {}}
    if balanced is not None:
        out["natural_balanced_acc"] = balanced[0]
        out["attacks"][attack]["balanced_acc"] = balanced[1]
    if curve is not None:
        out["security_curve"] = [{"eps": e, "robust_acc": a, "steps": 10} for e, a in curve]
    return out


def write(root, rel, obj):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh)
    return path


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "trained_models")
    write(root, "vgg16_bn/CIFAR10/pgd/pretrain/eval/model_best_standard.json",
          result("vgg16_bn", "pretrain", 1.0, 82.0, 47.0))
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/harp_finetune/eval/model_best_standard.json",
          result("vgg16_bn", "harp_finetune", 0.0100004, 79.42, 42.02))
    # The prune stage of the same run: the finetune result wins the cell.
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/harp_prune/eval/model_best_standard.json",
          result("vgg16_bn", "harp_prune", 0.0100004, 60.0, 30.0))
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.1/harp_finetune/eval/model_best_standard.json",
          result("vgg16_bn", "harp_finetune", 0.1, 80.70, 42.83))
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/score_finetune/eval/model_best_standard.json",
          result("vgg16_bn", "score_finetune", 0.01, 70.59, 35.56))
    write(root, "vgg16_bn/CIFAR10/pgd/c_c_010_uni_0.1/harp_finetune/eval/model_best_standard.json",
          result("vgg16_bn", "harp_finetune", 0.1, 66.45, 35.62, prune_reg="channel"))
    write(root, "resnet18/CIFAR10/pgd/c_w_010_uni_0.01/rate_finetune/eval/model_best_standard.json",
          result("resnet18", "rate_finetune", 0.01, 75.0, 40.0))
    # Another preset and a non-result JSON are ignored.
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/harp_finetune/eval/model_best_original.json",
          result("vgg16_bn", "harp_finetune", 0.01, 1.0, 1.0, preset="original"))
    write(root, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/harp_finetune/other.json", {"epoch": 3})
    return root


EXPECTED_MD = """\
**CIFAR10: natural / robust accuracy (%), robust = autoattack (standard preset)**

| method | granularity | resnet18 99% | vgg16_bn 90% | vgg16_bn 99% |
|---|---|---|---|---|
| dense | – | – | 82.00 / 47.00 | 82.00 / 47.00 |
| Hydra (score) | weight | – | – | 70.59 / 35.56 |
| rate | weight | 75.00 / 40.00 | – | – |
| HARP | weight | – | 80.70 / 42.83 | 79.42 / 42.02 |
| HARP | channel | – | 66.45 / 35.62 | – |
"""


def test_markdown_table_in_the_paper_layout(tree):
    assert make_tables.make_tables([tree]) == EXPECTED_MD


def test_show_sparsity_adds_each_models_exact_measured_sparsity(tree):
    text = make_tables.make_tables([tree], show_sparsity=True)
    assert "| 79.42 / 42.02 (99.00% sparse) |" in text  # global_keep 0.0100004: the column says 99%, the cell 99.00%
    assert "| 82.00 / 47.00 (0.00% sparse) |" in text
    assert "sparse" not in make_tables.make_tables([tree])


def test_cli_writes_csv_and_latex(tree, tmp_path, capsys):
    out = str(tmp_path / "t.csv")
    assert make_tables.main([tree, "--format", "csv", "-o", out]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    harp = [r for r in rows if (r["method"], r["granularity"], r["arch"]) == ("HARP", "weight", "vgg16_bn")]
    assert sorted((float(r["sparsity"]), float(r["natural"]), float(r["robust"]), int(r["n"])) for r in harp) == [
        (90.0, 80.70, 42.83, 1), (99.0, 79.42, 42.02, 1)]
    assert all(r["natural_std"] == "" for r in harp) and len(rows) == 6  # one line per cell, dense once
    assert make_tables.main([tree, "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}{llccc}" in tex and r"\multicolumn{2}{c}{vgg16\_bn}" in tex
    assert r"HARP & weight & -- & 80.70 / 42.83 & 79.42 / 42.02 \\" in tex
    assert r"99\%" in tex and r"\bottomrule" in tex and "booktabs" in tex


def test_other_attack_preset_and_errors(tree, capsys):
    text = make_tables.make_tables([tree], preset="original")
    assert "1.00 / 1.00" in text and "99%" in text
    assert make_tables.main([tree, "--attack", "pgd10"]) == 2
    err = capsys.readouterr().err
    assert "pgd10" in err and "autoattack" in err
    assert make_tables.main([str(os.path.join(tree, "nope"))]) == 2


def test_svhn_uses_balanced_accuracy_and_sparsity_rounding(tmp_path):
    root = str(tmp_path)
    write(root, "a/eval/model_best_standard.json",
          result("vgg16_bn", "harp_finetune", 0.001, 90.0, 40.0, dataset="SVHN", balanced=(88.5, 38.25)))
    text = make_tables.make_tables([root])
    assert "vgg16_bn 99.9%" in text and "88.50 / 38.25" in text and "balanced accuracy" in text
    assert "90.00 / 40.00" in make_tables.make_tables([root], metric="acc")


def test_plots_write_pngs(tree, tmp_path):
    curve_json = write(str(tmp_path), "c/eval/model_best_standard.json",
                       result("vgg16_bn", "harp_finetune", 0.01, 79.0, 42.0,
                              curve=[(0.01, 65.0), (0.031, 42.0), (0.05, 25.0)]))
    keep_json = os.path.join(tree, "vgg16_bn/CIFAR10/pgd/c_w_010_uni_0.01/harp_finetune/eval/model_best_standard.json")
    outputs = {
        "keep.png": ["keep-rates", keep_json],
        "acc.png": ["accuracy-sparsity", tree],
        "curve.png": ["security-curve", curve_json, curve_json, "--labels", "a", "b"],
    }
    for name, argv in outputs.items():
        out = str(tmp_path / "png" / name)
        assert plots.main(argv + ["-o", out]) == 0
        with open(out, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.main(["security-curve", keep_json, "-o", str(tmp_path / "x.png")]) == 2


def test_keep_rates_from_an_original_code_checkpoint(tmp_path):
    """Scores and k_score without a stored report: rates from k_score with --k/--alpha, counted as the masks."""
    import math

    state = {"module.features.0.weight": torch.randn(8, 3, 3, 3), "module.features.0.popup_scores": torch.randn(8, 3, 3, 3),
             "module.features.0.k_score": torch.tensor(0.0), "module.features.1.weight": torch.ones(8),
             "module.classifier.weight": torch.randn(10, 32), "module.classifier.bias": torch.zeros(10)}
    state["module.classifier.weight"][:, :16] = 0
    path = str(tmp_path / "orig.pth.tar")
    torch.save({"state_dict": state}, path)
    _, layers = plots.keep_rates_of(path, k=0.1, alpha=0.1)
    keep = 1 / (1 + math.exp(0)) * (1 - 0.01) + 0.01
    assert layers["features.0"]["kept"] == 216 - int((1 - keep) * 216)
    assert layers["classifier"]["keep"] == 0.5 and "features.1" not in layers
    with pytest.raises(plots.PlotError, match="--k"):
        plots.keep_rates_of(path)
    assert plots.main(["keep-rates", path, "--k", "0.1", "-o", str(tmp_path / "k.png")]) == 0


def run_result(arch, exp_mode, keep, natural, robust, *, run, exp_name="", seed=1234, gamma=1.0, **kw):
    """A result as test.py writes it for a run of ours: the checkpoint path and the training config."""
    out = result(arch, exp_mode, keep, natural, robust, **kw)
    out["checkpoint"] = os.path.join(run, "checkpoint", "model_best.pth.tar")
    out["train_config"] = {"exp_name": exp_name or None, "seed": seed, "gamma": gamma, "k": keep, "lr": 0.1}
    return out


def test_lwm_hydra_and_harp_get_three_rows(tmp_path):
    root = str(tmp_path)
    for mode, nat in (("score_finetune", 90.0), ("lwm_finetune", 85.0), ("harp_finetune", 91.0)):
        run = os.path.join(root, "r", mode)
        write(root, f"r/{mode}/eval/model_best_standard.json", run_result("small_cnn", mode, 0.01, nat, nat - 10,
                                                                           run=run, attack="pgd10"))
    text = make_tables.make_tables([root], attack="pgd10")
    assert "| Hydra (score) | weight | 90.00 / 80.00 |" in text
    assert "| LWM | weight | 85.00 / 75.00 |" in text and "| HARP | weight | 91.00 / 81.00 |" in text


def test_runs_that_share_a_cell_are_aggregated_or_kept_apart_never_picked_by_file_time(tmp_path):
    root = str(tmp_path)
    # Two seeds of the same settings (different --exp-name): replicates, shown as mean ± std with n.
    for name, seed, nat in (("s1", 1, 90.0), ("s2", 2, 92.0)):
        run = os.path.join(root, name, "harp_finetune")
        write(root, f"{name}/harp_finetune/eval/model_best_standard.json",
              run_result("small_cnn", "harp_finetune", 0.01, nat, nat - 10, run=run, exp_name=name, seed=seed))
    # A run with another gamma in the same cell: a row of its own, labelled by what differs.
    run = os.path.join(root, "g", "harp_finetune")
    write(root, "g/harp_finetune/eval/model_best_standard.json",
          run_result("small_cnn", "harp_finetune", 0.01, 70.0, 60.0, run=run, exp_name="g", gamma=0.1))
    text = make_tables.make_tables([root])
    assert "| HARP [gamma=1.0] | weight | 91.00 ± 1.41 / 81.00 ± 1.41 (n=2) |" in text
    assert "| HARP [gamma=0.1] | weight | 70.00 / 60.00 |" in text
    # The same checkpoint evaluated twice with different numbers: a clash, said so, no number picked.
    write(root, "g/harp_finetune/copy.json",
          run_result("small_cnn", "harp_finetune", 0.01, 71.0, 60.0, run=run, exp_name="g", gamma=0.1))
    assert "| HARP [gamma=0.1] | weight | clash: 2 results disagree |" in make_tables.make_tables([root])
    # An identical copy (test.py --results-file) counts once.
    write(root, "g/harp_finetune/copy.json",
          run_result("small_cnn", "harp_finetune", 0.01, 70.0, 60.0, run=run, exp_name="g", gamma=0.1))
    assert "| HARP [gamma=0.1] | weight | 70.00 / 60.00 |" in make_tables.make_tables([root])


def test_plots_read_the_same_groups(tmp_path):
    root = str(tmp_path)
    for name, seed, keep in (("a", 1, 0.01), ("b", 2, 0.01), ("c", 1, 0.1)):
        run = os.path.join(root, name, "harp_finetune")
        write(root, f"{name}/harp_finetune/eval/model_best_standard.json",
              run_result("small_cnn", "harp_finetune", keep, 90.0 + seed, 80.0, run=run, exp_name=name, seed=seed))
    out = str(tmp_path / "acc.png")
    assert plots.main(["accuracy-sparsity", root, "-o", out]) == 0


def test_missing_curve_hint_is_on_the_results_own_scale(tmp_path, capsys):
    path = write(str(tmp_path), "r.json", dict(result("small_cnn", "pretrain", 1.0, 99.0, 90.0), epsilon=0.1))
    assert plots.main(["security-curve", path, "-o", str(tmp_path / "c.png")]) == 2
    assert "--epsilons 0.025,0.05,0.1,0.2" in capsys.readouterr().err


def test_a_model_far_from_its_target_is_marked_in_its_cell_and_counted_in_the_csv(tmp_path):
    from pruning.budget import budget_record
    root = str(tmp_path)
    # Two seeds of HARP asked for k 0.01: one landed on it, one at 0.25 % (4x sparser than asked).
    for name, seed, reached in (("s1", 1, 0.0100), ("s2", 2, 0.0025)):
        run = os.path.join(root, name, "harp_finetune")
        data = run_result("small_cnn", "harp_finetune", 0.01, 90.0, 80.0, run=run, exp_name=name, seed=seed)
        data["budget"] = budget_record("weight", 0.01, reached)
        write(root, f"{name}/harp_finetune/eval/model_best_standard.json", data)
    text = make_tables.make_tables([root])
    assert "(n=2) [off target in 1 of 2 runs: kept 0.25 % vs 1 %] |" in text
    rows = list(csv.DictReader(io.StringIO(make_tables.make_tables([root], fmt="csv"))))
    assert [row["off_target_runs"] for row in rows] == ["1"]
    # On target (within 10 %): no mark.
    data["budget"] = budget_record("weight", 0.01, 0.0095)
    write(root, "s2/harp_finetune/eval/model_best_standard.json", data)
    assert "off target" not in make_tables.make_tables([root])
