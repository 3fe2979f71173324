"""stage.build_stage, the one stage builder of train.py and scripts/benchmark.py, and the contracts of the parts it
builds (trainers/protocols.py)."""
import dataclasses
import logging

import pytest
import torch

from configs.cli import resolve_config
from configs.schema import Config, config_to_dict
from data.info import dataset_info
from stage import Source, adopt_checkpoint, build_stage, option_choices
from trainers.protocols import Stateful
from trainers.regularizers import HOOKS
from trainers.attacks.threat import threat_from_config
from trainers.training import TRAINERS

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
INFO = dataset_info("digits")


def config(**options) -> Config:
    return Config(dataset="digits", arch="small_cnn", num_classes=INFO.num_classes, **options)


def same(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_training_loop_follows_the_protocol():
    cfg = config()
    for name in TRAINERS.in_order():
        loop = TRAINERS.get(name)(cfg, threat_from_config(cfg), CPU)
        assert isinstance(loop.hooks, tuple) and all(hook in HOOKS for hook in loop.hooks), name
        assert callable(loop.check_model) and callable(loop.train_epoch), name
        assert isinstance(loop, Stateful) == (name == "freeadv"), name  # only Free-AT's perturbation is state


def test_a_resumed_stage_holds_the_weights_optimizer_and_part_states_it_was_saved_with():
    """HARP's prune stage under Free-AT, started from a plain model in memory (as the benchmark starts it), trained
    one epoch as train.py trains it, saved as train.py saves it, and built again from that checkpoint."""
    torch.manual_seed(0)
    cfg = config(exp_mode="harp_prune", k=0.1, trainer="freeadv", rate_stg_init=True, soft_hw=True)
    threat = threat_from_config(cfg)
    plain = build_stage(config(), INFO, CPU, threat_from_config(config())).model
    stage = build_stage(cfg, INFO, CPU, threat, source=Source.of_model(plain, "the plain model"))
    parts = stage.parts
    assert set(parts.stateful()) == {"free_perturbation", "gamma"}

    x = torch.rand(8, INFO.in_channels, INFO.image_size, INFO.image_size)
    y = torch.randint(0, INFO.num_classes, (8,))
    for hook in parts.hooks.values():
        hook.before_epoch(0)
    stats = parts.loop.train_epoch(stage.model, stage.model, [(x, y)], parts.optimizer, epoch=0, num_batches=1,
                                   device=CPU, regularizers=list(parts.regularizers.values()), bf16=False,
                                   channels_last=False, print_freq=10, show_progress=False)
    record = {"epoch": 1, **stats}
    for regularizer in parts.regularizers.values():
        record.update(regularizer.measure())
    for hook in parts.hooks.values():
        hook.after_epoch(0, record)
    saved = {"state_dict": stage.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             **{key: part.state_dict() for key, part in parts.stateful().items()}}

    resumed = build_stage(cfg, INFO, CPU, threat, resume=Source(saved, "the saved run"))
    assert same(resumed.model.state_dict(), saved["state_dict"])
    assert same(resumed.parts.optimizer.state_dict(), saved["optimizer"])
    assert resumed.parts.optimizer.state_dict()["state"]  # momentum buffers: there was something to restore
    assert set(resumed.parts.stateful()) == set(parts.stateful())
    for key, part in resumed.parts.stateful().items():
        assert same(part.state_dict(), saved[key]), key
    assert resumed.parts.stateful()["free_perturbation"].state_dict()["delta"].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- test.py's adoption
def _adopt(argv, **trained):
    """test.py's config for a checkpoint trained with `trained` on top of the digits preset."""
    cfg, sources = resolve_config(["--dataset", "digits"] + argv, "test", "test.py", choices=option_choices())
    stored = config_to_dict(dataclasses.replace(cfg, exp_mode="pretrain", **trained))
    adopted, _ = adopt_checkpoint(["--dataset", "digits"] + argv, cfg, sources, {"config": stored}, "ckpt.pth.tar")
    return adopted


def test_a_smoothed_checkpoint_is_certified_at_its_training_sigma(caplog):
    assert _adopt([], trainer="smooth", noise_std=0.5).noise_std == 0.5
    assert _adopt([], trainer="adv", noise_std=0.5).noise_std == 0.25  # not smoothed: no sigma of its own
    with caplog.at_level(logging.WARNING, logger="stage"):
        assert _adopt(["--noise-std", "0.3"], trainer="smooth", noise_std=0.5).noise_std == 0.3
    assert "trained with noise_std 0.5; evaluating with 0.3" in caplog.text
