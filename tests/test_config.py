"""Config resolution: precedence, presets with per-mode/per-loss sections, both flag spellings, errors."""
import pytest

from configs.cli import build_parser, resolve_config
from configs.errors import UserError
from configs.schema import OPTIONS

SEED_PRUNE = ["--arch", "vgg16_bn", "--dataset", "CIFAR10", "--exp-mode", "harp_prune", "--k", "0.01", "--prune_reg",
              "weight", "--stg_id", "010_uni", "--adv_loss", "pgd", "--gamma", "0.01", "--epochs", "20"]


def resolve(*argv, scope="train"):
    return resolve_config(list(argv), scope, "train.py")[0]


def test_seed_prune_command_gets_the_original_hyperparameters():
    cfg = resolve(*SEED_PRUNE)
    assert (cfg.exp_mode, cfg.k, cfg.gamma, cfg.epochs, cfg.stg_id) == ("harp_prune", 0.01, 0.01, 20, "010_uni")
    assert (cfg.lr, cfg.wd, cfg.momentum, cfg.epsilon, cfg.step_size, cfg.num_steps) == (0.1, 5e-4, 0.9, 0.031, 0.0078, 10)
    assert cfg.scaled_score_init and cfg.rate_stg_init and cfg.soft_hw


def test_per_mode_section_sets_finetune_lr_unless_the_user_sets_it(tmp_path):
    assert resolve("--dataset", "CIFAR10", "--exp-mode", "harp_finetune", "--k", "0.1").lr == 0.01
    assert resolve("--dataset", "CIFAR10", "--exp-mode", "pretrain").lr == 0.1
    assert resolve("--dataset", "CIFAR10", "--exp-mode", "harp_finetune", "--k", "0.1", "--lr", "0.05").lr == 0.05
    user = tmp_path / "mine.yml"
    user.write_text("lr: 0.02\nepochs: 7\nk: 0.1\n")
    cfg = resolve("--dataset", "CIFAR10", "--exp-mode", "score_finetune", "--configs", str(user))
    assert (cfg.lr, cfg.epochs, cfg.epsilon) == (0.02, 7, 0.031)  # user file beats the preset, preset still applies
    cfg = resolve("--dataset", "CIFAR10", "--exp-mode", "score_finetune", "--configs", str(user), "--epochs", "3")
    assert cfg.epochs == 3  # the command line beats the user file


def test_per_loss_section_sets_beta():
    assert resolve("--dataset", "SVHN", "--adv_loss", "trades").beta == 6.0
    assert resolve("--dataset", "SVHN", "--adv_loss", "mart").beta == 5.0
    assert resolve("--dataset", "SVHN", "--adv_loss", "mart", "--beta", "2").beta == 2.0


def test_both_spellings_and_hyphenated_modes_are_accepted():
    a = resolve("--prune_reg", "channel", "--exp-mode", "harp-prune", "--batch_size", "32", "--stg-id", "005_erk",
                "--k", "0.1")
    b = resolve("--prune-reg", "channel", "--exp_mode", "harp_prune", "--batch-size", "32", "--stg_id", "005_erk",
                "--k", "0.1")
    assert a == b and a.exp_mode == "harp_prune" and a.batch_size == 32
    assert resolve("--dataset", "cifar10").dataset == "CIFAR10"


def test_help_shows_one_spelling_per_option():
    text = build_parser("train.py", "train").format_help()
    assert "--prune-reg" in text and "--prune_reg" not in text
    assert "--adv-loss" in text and "--adv_loss" not in text


def test_every_option_has_help_and_a_valid_default():
    for opt in OPTIONS:
        assert opt.help, opt.name
        if opt.choices and opt.default is not None:
            assert opt.default in opt.choices, opt.name


def test_every_preset_resolves_in_every_mode():
    for dataset in ("CIFAR10", "CIFAR100", "SVHN", "MNIST", "imagenet", "digits"):
        for mode in ("pretrain", "score_prune", "rate_finetune", "harp_prune", "harp_finetune"):
            cfg = resolve("--dataset", dataset, "--exp-mode", mode, "--k", "0.1")
            assert cfg.arch and cfg.epochs >= 1, (dataset, mode)
    assert resolve("--dataset", "imagenet").trainer == "freeadv"


@pytest.mark.parametrize("argv,message", [
    (["--k", "0"], "k must be in (0, 1]"),
    (["--k", "1.5"], "k must be in (0, 1]"),
    (["--epochs", "-1"], "epochs must be >= 1"),
    (["--dataset", "cifar11"], "choose one of"),
    (["--exp-mode", "prune"], "choose one of"),
    (["--arch"], "expected one argument"),
    (["--nonsense", "1"], "unrecognized arguments"),
    (["--alpha", "1"], "alpha must be in [0, 1)"),
    (["--trainer", "base", "--adv_loss", "trades"], "--trainer base trains on clean inputs"),
    (["--conv_k", "0.5"], "not supported"),
    (["--layer-type", "dense", "--exp-mode", "harp_prune", "--k", "0.1"], "needs masked layers"),
    (["--exp-mode", "harp_prune"], "--k is required in harp_prune"),
    (["--epoch", "5"], "unrecognized arguments: --epoch 5 (did you mean: --epoch -> --epochs?)"),
    (["--eps", "0.2"], "unrecognized arguments"),
    (["--clip-min", "1", "--clip-max", "0"], "must be below clip_max"),
])
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as err:
        resolve(*argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_yaml_keys_and_sections_are_errors(tmp_path):
    for text, message in [("lrr: 0.1\n", "unknown key 'lrr'"),
                          ("per_mode:\n  prunning: {lr: 0.1}\n", "unknown per_mode entry 'prunning'"),
                          ("per_mode:\n  prune: {lrr: 0.1}\n", "unknown key 'lrr' in per_mode.prune"),
                          ("k: [1, 2\n", "cannot read config file")]:
        path = tmp_path / "c.yml"
        path.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
            resolve("--configs", str(path))
    with pytest.raises(UserError, match="does not exist"):
        resolve("--configs", str(tmp_path / "missing.yml"))


def test_test_only_flags_are_rejected_by_train():
    with pytest.raises(UserError, match="unrecognized arguments"):
        resolve("--attacks", "pgd10")
    assert resolve("--attacks", "pgd10", scope="test").attacks == "pgd10"


def test_the_cli_offers_exactly_the_datasets_the_data_package_knows():
    from configs.schema import DATASETS
    from data import dataset_names
    assert list(DATASETS) == dataset_names()
