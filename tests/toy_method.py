"""A toy pruning method added as a plug-in: random masks at a uniform --k, finetuned from the pretrained net.

This module is everything the method needs — a score initialisation and a stage recipe, each registered once —
and it touches neither train.py, test.py, configs/cli.py nor utils/run_dir.py.
"""
import torch

from configs.recipes import RATES_UNIFORM, RECIPES, Recipe, register_recipe
from pruning.init import SCORE_INITS
from pruning.wrap import masked_layers

NAME = "random_finetune"


def random_scores(model: torch.nn.Module) -> None:
    """Uniform random importance scores (drawn from torch's seeded generator): a random mask at each layer's rate."""
    with torch.no_grad():
        for _, layer in masked_layers(model):
            layer.popup_scores.uniform_(0.0, 1.0)


def install() -> None:
    if NAME in RECIPES:
        return
    SCORE_INITS.add("random", random_scores)
    register_recipe(Recipe(NAME, "finetune", "random", starts_from="pretrain", masked=True, freeze_masks=True,
                           score_init="random", rate_init=RATES_UNIFORM))
