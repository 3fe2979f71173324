"""APGD-CE from torchattacks, 50 steps and 5 restarts, as the original test.py ran it."""
from trainers.attacks.threat import LINF
from trainers.evaluation.registry import ATTACKS, AttackSpec

APGD_STEPS, APGD_RESTARTS = 50, 5


def torchattacks_norm(norm: str) -> str:
    """torchattacks' spelling of a threat model's norm."""
    if norm not in (LINF, "l2"):
        raise ValueError(f"torchattacks supports the linf and l2 threat models, not {norm!r}")
    return "Linf" if norm == LINF else "L2"


def _apgd(model, s):
    import torchattacks

    attack = torchattacks.APGD(model, norm=torchattacks_norm(s.norm), eps=s.eps, steps=APGD_STEPS,
                               n_restarts=APGD_RESTARTS, seed=s.seed, loss="ce", eot_iter=1, rho=0.75)
    return lambda x, y: attack(x, y)


ATTACKS.add("apgd", AttackSpec(
    "apgd", f"torchattacks APGD-CE, {APGD_STEPS} steps, {APGD_RESTARTS} restarts",
    lambda s: dict(steps=APGD_STEPS, restarts=APGD_RESTARTS, loss="ce", rho=0.75,
                   implementation="torchattacks.APGD", seed=s.seed), make=_apgd))
