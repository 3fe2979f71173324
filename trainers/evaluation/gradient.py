"""The white-box gradient attacks by name (README, Evaluation; the original's test.py ran pgd):

    pgd          PGD on cross-entropy under the configured threat model (validation's default; not in 'all')
    fgsm         one step of size eps from the clean input (Linf: sign of the gradient; L2: normalised gradient)
    pgd10/20/50  PGD-k on cross-entropy, random start, the configured step size
    cw           PGD on the CW margin loss (kappa 50), 20 steps, random start, the configured step size

Their names fix everything they do, so they have no options of their own; their pre-flight check refuses a threat
model they cannot step in (a norm other than Linf and L2; for the PGD family no step, or a zero step size).
"""
from configs.errors import UserError
from trainers.attacks.pgd import CW_KAPPA, fgsm, pgd
from trainers.attacks.threat import L2, LINF
from trainers.evaluation.registry import ATTACKS, AttackSpec

CW_STEPS = 20


def check_step(model, settings, options, points) -> None:
    """The norm is one the steps know (FGSM)."""
    if settings.norm not in (LINF, L2):
        raise UserError(f"gradient steps are defined in linf and l2, not {settings.norm!r}")


def check_pgd(model, settings, options, points) -> None:
    """check_step, and at least one step of a positive size (else the attack reports clean accuracy)."""
    check_step(model, settings, options, points)
    threat = settings.threat
    if threat.steps < 1:
        raise UserError(f"--num-steps {threat.steps}: PGD needs at least one step")
    if settings.eps > 0 and threat.step_size <= 0:
        raise UserError(f"--step-size {threat.step_size:g}: PGD needs a positive step size")


def _pgd_params(loss: str, **extra):
    def params(s, options):
        t = s.threat
        return dict(steps=t.steps, step_size=t.step_size, random_start=t.random_start, restarts=1, loss=loss, **extra)
    return params


def _pgd_ce(model, s, options):
    return lambda x, y: pgd(model, x, y, s.threat)


ATTACKS.add("pgd", AttackSpec(
    "pgd", "PGD on cross-entropy with --num-steps steps (validation's attack)", make=_pgd_ce,
    params=_pgd_params("ce"), check=check_pgd, in_all=False, validation=True))
ATTACKS.add("fgsm", AttackSpec(
    "fgsm", "one gradient step of size eps from the clean input",
    make=lambda model, s, options: (lambda x, y: fgsm(model, x, y, s.threat)),
    params=lambda s, options: dict(steps=1, step_size=s.eps, random_start=False, restarts=1, loss="ce"),
    check=check_step, validation=True))
for _steps in (10, 20, 50):
    ATTACKS.add(f"pgd{_steps}", AttackSpec(
        f"pgd{_steps}", f"PGD-{_steps} on cross-entropy, random start", make=_pgd_ce, params=_pgd_params("ce"),
        check=check_pgd, fixed=dict(steps=_steps, random_start=True)))
ATTACKS.add("cw", AttackSpec(
    "cw", f"PGD on the CW margin loss (kappa {CW_KAPPA:g}), {CW_STEPS} steps, random start",
    make=lambda model, s, options: (lambda x, y: pgd(model, x, y, s.threat, loss="cw")),
    params=_pgd_params("cw-margin", kappa=CW_KAPPA), check=check_pgd, fixed=dict(steps=CW_STEPS, random_start=True),
    validation=True))
