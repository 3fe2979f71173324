"""APGD-CE from torchattacks, 50 steps and 5 restarts, as the original test.py ran it."""
from configs.errors import UserError
from trainers.attacks.threat import L2, LINF
from trainers.evaluation.registry import ATTACKS, AttackSpec

APGD_STEPS, APGD_RESTARTS = 50, 5


def torchattacks_norm(norm: str) -> str:
    """torchattacks' spelling of a threat model's norm."""
    if norm not in (LINF, L2):
        raise UserError(f"torchattacks supports the linf and l2 threat models, not {norm!r}")
    return "Linf" if norm == LINF else "L2"


def check_torchattacks(model, settings, options, points) -> None:
    """torchattacks is installed and supports the threat model's norm."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        raise UserError("needs torchattacks (pip install -r requirements.txt)") from None
    torchattacks_norm(settings.norm)


def _apgd(model, s, options):
    import torchattacks

    attack = torchattacks.APGD(model, norm=torchattacks_norm(s.norm), eps=s.eps, steps=APGD_STEPS,
                               n_restarts=APGD_RESTARTS, seed=s.seed, loss="ce", eot_iter=1, rho=0.75)
    return lambda x, y: attack(x, y)


ATTACKS.add("apgd", AttackSpec(
    "apgd", f"torchattacks APGD-CE, {APGD_STEPS} steps, {APGD_RESTARTS} restarts", make=_apgd,
    params=lambda s, options: dict(steps=APGD_STEPS, restarts=APGD_RESTARTS, loss="ce", rho=0.75,
                                   implementation="torchattacks.APGD", seed=s.seed),
    check=check_torchattacks))
