"""The experiment-mode table: what each HARP stage trains, where it starts from, and how it selects.

Everything mode-dependent that the original scattered over `parse_configs_file`, `prepare_model` and
`train.py` is declared here once (harp-spec §3.1). Per-mode *hyper-parameters* (lr, epochs) are not
here: they live in the dataset presets so a user's config or flag can override them.
"""
from dataclasses import dataclass
from typing import Optional

from configs.errors import UserError


@dataclass(frozen=True)
class ModeSpec:
    name: str
    stage: str                    # 'pretrain', 'prune' or 'finetune' (selects the preset section)
    masked: bool                  # the model carries scores and rate logits (every mode but pretrain)
    train_weights: bool           # conv/linear weights and biases get gradients
    train_scores: bool            # popup_scores get gradients
    train_rates: bool             # k_score (rate logits) get gradients
    rates_from_strategy: bool     # rate logits start from --stg_id (else: uniform at --k)
    hw_loss: bool                 # add gamma * hardware loss
    source_mode: Optional[str]    # the stage whose best checkpoint this one starts from


_MODES = (
    ModeSpec("pretrain", "pretrain", False, True, False, False, False, False, None),
    ModeSpec("score_prune", "prune", True, False, True, False, False, False, "pretrain"),
    ModeSpec("score_finetune", "finetune", True, True, False, False, False, False, "score_prune"),
    ModeSpec("rate_prune", "prune", True, False, False, True, True, True, "pretrain"),
    ModeSpec("rate_finetune", "finetune", True, True, False, False, True, False, "rate_prune"),
    ModeSpec("harp_prune", "prune", True, False, True, True, True, True, "pretrain"),
    ModeSpec("harp_finetune", "finetune", True, True, False, False, True, False, "harp_prune"),
)
MODES = {m.name: m for m in _MODES}
MODE_NAMES = tuple(MODES)


def canonical_mode(name: str) -> str:
    """Accept the README's hyphenated spellings (`harp-prune`) as well as `harp_prune`."""
    key = name.strip().replace("-", "_").lower()
    if key not in MODES:
        raise UserError(f"unknown exp-mode {name!r}; choose one of: {', '.join(MODE_NAMES)}")
    return key
