"""Extra loss terms (regularizers) and per-epoch hooks that a stage recipe names (configs/recipes.py).

A regularizer is a callable returning an unweighted differentiable term; the engine adds `weight * term` to the
loss at every step and reports the term's mean as `<name>_mean`; its `after_step` runs after every optimizer step
(stage.set_up_training registers it on the optimizer, so it works under every training loop). A hook runs around each epoch: `before_epoch`
may set weights and returns metrics for the epoch's record, `after_epoch` sees the finished record. Anything
with state (`state_dict`/`load_state_dict`) is saved in every checkpoint under the `state_key` it declares and
restored on resume by the entry point's one generic path, so a new method's state needs no checkpoint code.

Builders: `REGULARIZERS.add(name, builder(cfg, model, graph) -> Regularizer)` and
`HOOKS.add(name, builder(cfg, regularizers: {name: Regularizer}) -> hook)`.
"""
import logging
from typing import Any, Dict, Protocol

import torch

from configs.errors import UserError
from pruning.budget import CostModel, GammaSchedule, target_met
from pruning.gates import BUDGET_TOLERANCE, gate_layers, on_budget, project_to_target, set_gates_trainable
from utils.registry import Registry

log = logging.getLogger(__name__)

REGULARIZERS = Registry("regularizer")
HOOKS = Registry("epoch hook")


class Regularizer(Protocol):
    name: str          # metrics key of its value
    weight: float      # multiplies the term in the loss; hooks may change it per epoch

    def __call__(self) -> torch.Tensor: ...

    def measure(self) -> Dict[str, Any]: ...   # end-of-epoch metrics for the epoch's record

    def after_step(self) -> None: ...          # runs after every optimizer step (e.g. a projection of the rates)


class HardwareLoss:
    """HARP's hardware loss max(a / a_target - 1, 0) on the soft cost a of the masked model (HARP paper Sec. 3; the
    original's utils/hw.py).

    With `floor` (--target-floor, ours) the rates are also held at the target from below: the hinge only pushes
    down, so one large step (a large gamma over a small target) can drive a far under the target with nothing but
    the task loss to bring it back; after every optimizer step that leaves a under the target, `after_step`
    shifts every rate logit by one constant back onto it (pruning.budget.CostModel.raise_to_target)."""

    name = "hw_loss"

    def __init__(self, cost_model: CostModel, weight: float = 0.0, floor: bool = False):
        self.cost_model = cost_model
        self.weight = weight
        self.floor = floor

    def __call__(self) -> torch.Tensor:
        return self.cost_model.loss()[0]

    def after_step(self) -> None:
        if self.floor:
            self.cost_model.raise_to_target()

    def measure(self) -> Dict[str, Any]:
        with torch.no_grad():
            hw, cost = self.cost_model.loss()
        hw = float(hw)
        return {"hw_loss": hw, "soft_cost": float(cost), "target_met": target_met(hw)}


class GateBudgetLoss(HardwareLoss):
    """The hardware loss of in-train gates (pruning/gates.py), on their hard cost; an epoch meets the target when
    it is on budget (`pruning.gates.on_budget`: at most the target and less than 5 % below it).

    With `floor` (--target-floor) the gates are held on the budget from below: the budget loss moves gates that
    feel the same gradient together, so one epoch can close almost all of them (on digits at k = 0.1, 99.9 % ->
    1.07 % kept); after any step that leaves the hard cost more than BUDGET_TOLERANCE under the target, the best
    closed gates are reopened up to it (`pruning.gates.project_to_target`), so the cost falls onto the target and
    stays there instead of collapsing."""

    def measure(self) -> Dict[str, Any]:
        record = super().measure()
        record["target_met"] = on_budget(record["soft_cost"], self.cost_model.target)
        return record

    def after_step(self) -> None:
        target = self.cost_model.target
        if self.floor and float(self.cost_model.soft_cost().detach()) < (1.0 - BUDGET_TOLERANCE) * target:
            project_to_target(self.cost_model)


def _hardware(cfg, model, graph) -> HardwareLoss:
    cost_model = CostModel(model, graph, cfg.prune_reg, cfg.k)
    log.info("hardware target a_target = %.6f (%s), current soft a = %.6f", cost_model.target,
             "keep fraction" if cfg.prune_reg == "weight" else "FLOPs ratio", float(cost_model.soft_cost().detach()))
    return (GateBudgetLoss if gate_layers(model) else HardwareLoss)(cost_model, floor=cfg.target_floor)


class GateSettle:
    """In-train pruning's last phase (a reconstruction, pruning/gates.py): before each of the last `epochs` epochs
    the gates are projected onto the budget (`pruning.gates.project_to_target`: the open gates become those of
    largest logit that fit it) and frozen, so only the weights train and every epoch of the phase is on budget.
    It holds no state: after a resume the projection finds nothing to change and the gates are frozen again."""

    def __init__(self, regularizer: HardwareLoss, total_epochs: int, epochs: int):
        if epochs >= total_epochs:
            raise UserError(f"--gate-settle-epochs {epochs} leaves no epoch of in-train pruning before it "
                            f"({total_epochs} epochs in all)")
        self.cost_model, self.start = regularizer.cost_model, total_epochs - epochs

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        if epoch < self.start:
            return {}
        shift = project_to_target(self.cost_model)
        if shift is not None:
            log.info("projected the gates onto the budget: logits shifted by %.6g, hard cost %.6f (target %.6f)",
                     -shift, float(self.cost_model.soft_cost().detach()), self.cost_model.target)
        set_gates_trainable(self.cost_model.layers, False)
        return {"gates_frozen": True}

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        pass


def _gate_settle(cfg, regularizers) -> GateSettle:
    if "hardware" not in regularizers:
        raise UserError("in-train pruning reaches its budget through the hardware loss; drop --no-soft-hw")
    total = cfg.epochs + cfg.warmup_epochs
    settle = min(max(1, cfg.epochs // 4), total - 1) if cfg.gate_settle_epochs is None else cfg.gate_settle_epochs
    return GateSettle(regularizers["hardware"], total, settle)


REGULARIZERS.add("hardware", _hardware)
HOOKS.add("dynamic_gamma", lambda cfg, regularizers: GammaSchedule(cfg.gamma, cfg.gamma_dynamic,
                                                                   regularizer=regularizers["hardware"]))
HOOKS.add("gate_settle", _gate_settle)
