"""Fitting a checkpoint's weights to a model: ours, the original HARP/Hydra layouts, and dense exports.

The one place both entry points load weights through. What a state dict holds decides how it fits:

- scores (`popup_scores`) and rate logits (`k_score`): a pruned model of ours or of the original HARP code;
- scores without rate logits: Hydra's layout, whose layers all keep the uniform fraction k;
- rate logits without scores: the original HARP code's dense export (masks folded into the weights, the
  rate logits left over), loaded as plain weights;
- neither: a dense model (a pretrain run, or a dense export of ours).

A mismatch (unexpected or missing weights, a wrong shape) is a one-line UserError that names the checkpoint.
"""
import logging
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.nn as nn

from configs.errors import UserError
from pruning.init import set_keep_rates
from pruning.wrap import RATE_KEY, SCORE_KEY, masked_layers

log = logging.getLogger(__name__)


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _is_pruning_key(key: str) -> bool:
    return _leaf(key) in (SCORE_KEY, RATE_KEY)


@dataclass(frozen=True)
class StateContents:
    has_scores: bool
    has_rates: bool
    granularity: Optional[str]   # 'weight' or 'channel', from the score shapes (None without scores)

    @property
    def pruned(self) -> bool:
        """Carries masks to restore (ours, HARP's or Hydra's layout), as opposed to plain weights."""
        return self.has_scores


def describe_state(state: Mapping[str, torch.Tensor]) -> StateContents:
    scores = [k for k in state if _leaf(k) == SCORE_KEY]
    rates = any(_leaf(k) == RATE_KEY for k in state)
    granularity = None
    if scores:
        weights = [k.rpartition(".")[0] + ".weight" for k in scores]
        same = all(w in state and state[w].shape == state[s].shape for w, s in zip(weights, scores))
        granularity = "weight" if same else "channel"
    return StateContents(bool(scores), rates, granularity)


def check_trained_with(ckpt: Mapping, path: str, **expected) -> None:
    """A checkpoint of ours records its config: refuse one trained on another architecture or dataset."""
    stored = ckpt.get("config") or {}
    for key, value in expected.items():
        if stored.get(key) is not None and stored[key] != value:
            raise UserError(f"checkpoint {path} was trained with {key} {stored[key]}, not {value}")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: str, *, keep_pruning_state: bool,
                 uniform_keep: Optional[float] = None) -> List[str]:
    """Load `state` into `model`, strictly apart from the pruning state; returns the model keys it did not provide.

    keep_pruning_state: load the checkpoint's scores and rate logits (finetune, resume, evaluation); otherwise
    they are ignored and the model keeps its own (a prune stage re-initialises them). A Hydra-layout state
    (scores, no rate logits) then gets every layer's keep rate set to `uniform_keep`. Leftover rate logits of an
    original HARP dense export are dropped.
    """
    contents = describe_state(state)
    if contents.has_rates and not contents.has_scores:
        state = {k: v for k, v in state.items() if _leaf(k) != RATE_KEY}
        log.info("%s: dense weights with leftover k_score entries (original HARP export); k_score ignored", path)
    if not keep_pruning_state:
        state = {k: v for k, v in state.items() if not _is_pruning_key(k)}
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected:
        raise UserError(f"checkpoint {path} does not fit this model: unexpected keys {unexpected[:4]} "
                        f"(is it a {model.__class__.__name__} with the same --arch/--dataset/--prune_reg?)")
    bad_missing = [k for k in missing if not _is_pruning_key(k)]
    if bad_missing:
        raise UserError(f"checkpoint {path} does not fit this model: missing keys {bad_missing[:4]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"checkpoint {path} does not fit this model: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(own[key].shape)} (different --prune_reg or --num-classes?)")
    model.load_state_dict(state, strict=False)
    if keep_pruning_state and contents.has_scores and not contents.has_rates and masked_layers(model):
        if uniform_keep is None:
            raise ValueError("a Hydra-layout checkpoint needs uniform_keep")
        set_keep_rates(model, {name: uniform_keep for name, _ in masked_layers(model)})
        log.info("no k_score in %s (Hydra layout): every layer keeps k = %g", path, uniform_keep)
    return missing

