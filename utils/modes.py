"""Module modes: evaluate a model (BatchNorm statistics untouched, no dropout) and leave every module as it was."""
import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; afterwards each module gets back its own mode (a model may mix modes, e.g.
    frozen BatchNorm layers in eval mode inside a model that trains)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
