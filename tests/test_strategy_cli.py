"""Strategy files on the command line (--stg_id FILE:ID), the learned-rate export of train.py, and
scripts/search_strategy.py, end to end on digits with natural training and one epoch per stage."""
import csv
import json
import os

import pytest
import torch
import yaml

import train
from configs.errors import UserError
from models import create_model
from pruning.wrap import prunable_layers
from strategies import parse_strategy_id
from strategies.files import keep_rates_from_sparsity, load_strategy
from tests.conftest import load_entry_point, single_thread
from utils.checkpoint import load_checkpoint
from utils.run_dir import strategy_label

search = load_entry_point("scripts/search_strategy.py", "harp_search_strategy")
test_py = load_entry_point("test.py", "harp_test_entry_for_strategies")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {name: layer.weight.numel() for name, layer in prunable_layers(
    create_model("small_cnn", num_classes=10, in_channels=1, input_size=8))}  # digits' model, registration order
LAYERS = list(SIZES)
# A non-uniform strategy at about k = 0.05 of small_cnn's 633,920 weights: the small first and last layers dense-ish.
RATES = {"features.0": 0.6, "features.3": 0.1, "features.6": 0.05, "classifier.0": 0.03, "classifier.2": 0.5}
K = "0.05"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A digits pretrain run (natural training, 1 epoch) and a strategy file with two strategies."""
    with single_thread():
        root = tmp_path_factory.mktemp("strategy_cli")
        assert train.main(common(root) + ["--exp-mode", "pretrain"]) == 0
    (root / "stg.yaml").write_text(yaml.safe_dump(
        {"arch": "small_cnn", "weight": {"mine": RATES, "flat": {name: 0.05 for name in LAYERS}}}))
    return root


def common(root):
    return ["--dataset", "digits", "--trainer", "base", "--val-method", "base", "--epochs", "1", "--lr-schedule",
            "constant", "--result-dir", str(root), "--no-progress"]


def run_dir(root, name, mode):
    return os.path.join(str(root), "small_cnn", "digits", "nat", name, mode)


def per_layer_keep(directory):
    ckpt = load_checkpoint(os.path.join(directory, "checkpoint", "model_best.pth.tar"))
    return keep_rates_from_sparsity(ckpt["sparsity"])


def assert_keeps(actual, expected):
    """Kept fractions of a mask at rate k: n - floor((1 - k) n) of n weights, i.e. within one weight of k."""
    assert list(actual) == LAYERS
    for name in LAYERS:
        assert abs(actual[name] - expected[name]) <= 1.0 / SIZES[name] + 1e-9, name


def test_run_names_use_the_strategy_label():
    assert strategy_label("010_uni") == "010_uni"
    assert strategy_label("runs/a/strategy.yaml:harp_prune") == "strategy-harp_prune"
    assert strategy_label("/x/heracles.json:010_0") == "heracles-010_0"
    assert strategy_label("/x/only.yml") == "only"


def test_hydra_and_lwm_with_a_strategy_file(root):
    """score_prune -> score_finetune and lwm_finetune with FILE:ID: every layer keeps the file's rate (a file
    sets the rates although these recipes start uniform), in a run directory named by the label; test.py finds it."""
    stg = ["--k", K, "--stg_id", f"{root / 'stg.yaml'}:mine"]
    assert train.main(common(root) + stg + ["--exp-mode", "score_prune"]) == 0
    assert train.main(common(root) + stg + ["--exp-mode", "score_finetune"]) == 0
    assert train.main(common(root) + stg + ["--exp-mode", "lwm_finetune"]) == 0
    for mode in ("score_prune", "score_finetune", "lwm_finetune"):
        assert_keeps(per_layer_keep(run_dir(root, f"digits_weight_stg-mine_{K}", mode)), RATES)
    # Uniform Hydra at the same k is a run of its own.
    assert train.main(common(root) + ["--k", K, "--stg_id", "005_uni", "--exp-mode", "score_prune"]) == 0
    assert_keeps(per_layer_keep(run_dir(root, f"digits_weight_005_uni_{K}", "score_prune")), {n: 0.05 for n in LAYERS})

    assert test_py.main(["--dataset", "digits", "--trainer", "base", "--result-dir", str(root), "--exp-mode",
                         "score_finetune", "--attacks", "natural"] + stg) == 0
    evaluated = run_dir(root, f"digits_weight_stg-mine_{K}", "score_finetune")
    with open(os.path.join(evaluated, "eval", "model_best_standard.json")) as f:
        assert json.load(f)["stg_id"] == f"{root / 'stg.yaml'}:mine"


@pytest.mark.parametrize("value, message", [
    ("{dir}/missing.yaml:mine", "strategy file {dir}/missing.yaml does not exist"),
    ("{dir}/stg.yaml:nope", "has no small_cnn weight strategy 'nope'; it has flat, mine"),
    ("{dir}/stg.yaml", "holds 2 small_cnn weight strategies; choose one with --stg_id"),
    ("010_foo", "or FILE.yaml:ID"),
])
def test_bad_strategy_arguments_are_one_line_errors(root, capsys, value, message):
    capsys.readouterr()
    code = train.main(common(root) + ["--k", K, "--stg_id", value.format(dir=root), "--exp-mode", "score_prune",
                                      "--exp-name", "refused"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message.format(dir=root) in err and "\n" not in err and err.startswith("train.py: error:")
    assert not os.path.exists(run_dir(root, "refused", "score_prune"))  # nothing written


def test_a_learned_strategy_is_exported_and_seeds_hydra(root):
    """harp_prune writes its best checkpoint's per-layer keep to <run>/strategy.yaml; importing it gives those
    rates back, and score_prune started from it keeps them."""
    # Started under the target with a strong hardware loss, one epoch meets it (a best checkpoint exists).
    harp = common(root) + ["--k", K, "--stg_id", "004_uni", "--gamma", "1", "--lr", "0.01"]
    assert train.main(harp + ["--exp-mode", "harp_prune"]) == 0
    directory = run_dir(root, f"digits_weight_004_uni_{K}", "harp_prune")
    learned = per_layer_keep(directory)
    exported = load_strategy(os.path.join(directory, "strategy.yaml"), arch="small_cnn", granularity="weight",
                             layer_names=LAYERS)
    assert (exported.stg_id, exported.rates) == ("harp_prune", learned)
    history = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    assert [r["per_layer_keep"] for r in history if r["is_best"]][-1] == learned

    stg = ["--k", K, "--stg_id", f"{directory}/strategy.yaml:harp_prune", "--exp-mode", "score_prune"]
    assert train.main(common(root) + stg) == 0
    hydra = run_dir(root, f"digits_weight_strategy-harp_prune_{K}", "score_prune")
    assert_keeps(per_layer_keep(hydra), learned)
    assert not os.path.exists(os.path.join(hydra, "strategy.yaml"))  # a mode that learns no rates exports none


def test_search_script_writes_a_strategy_within_the_budget(root, tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["--dataset", "digits", "--trainer", "base", "--result-dir", str(root), "--k", K, "--method", "random",
            "--episodes", "3", "--val-split", "0.2", "--num-steps", "2", "--out", str(out)]
    capsys.readouterr()
    assert search.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"--stg_id {out}/strategy.yaml:random_0.05" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["references"]) == {"uni 0.05", "erk 0.05", "lamp 0.05"}
    assert summary["reward_examples"] == 287  # 0.2 of digits' 1,437 training images
    with open(out / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        keeps = {name: float(row[f"keep.{name}"]) for name in LAYERS}
        assert all(0.01 <= k <= 0.8 for k in keeps.values())
        assert sum(keeps[n] * SIZES[n] for n in LAYERS) <= 0.05 * sum(SIZES.values()) * (1 + 1e-9)
        assert float(row["reward"]) == pytest.approx((float(row["natural_acc"]) + float(row["robust_acc"])) / 100)
    best = max(rows, key=lambda r: float(r["reward"]))
    strategy = load_strategy(f"{out}/strategy.yaml:random_0.05", arch="small_cnn", granularity="weight",
                             layer_names=LAYERS)
    assert strategy.rates == pytest.approx({name: float(best[f"keep.{name}"]) for name in LAYERS})
    assert summary["best"]["reward"] == pytest.approx(float(best["reward"]))

    # A finished search is not overwritten; the search starts from the pretrained model, whatever --exp-mode says.
    assert search.main(argv) == 2
    assert "already holds a finished search" in capsys.readouterr().err
    assert search.main(argv + ["--exp-mode", "harp_prune"]) == 2
    assert "drop --exp-mode" in capsys.readouterr().err


def test_bad_id_message_names_the_file_forms():
    with pytest.raises(UserError, match="FILE.yaml"):
        parse_strategy_id("not-an-id")
