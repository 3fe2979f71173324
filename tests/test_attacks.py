"""Properties of test.py's per-batch attacks (trainers/evaluation/, trainers/attacks/pgd.py) on tiny models.

Every attack keeps its output inside the eps-ball and [0, 1]; robust accuracy never exceeds natural
accuracy; the model is in eval mode during attacks and each module's mode is restored afterwards; the same
seed gives the same numbers on the CPU.
"""
import pytest
import torch
from torch import nn

from configs.errors import UserError
from pruning.wrap import freeze_masks, model_sparsity, sparsify
from trainers.attacks.pgd import fgsm
from trainers.attacks.threat import LINF, L2, ThreatModel, perturbation_norms
from trainers.evaluation.registry import (EvalSettings, NoOptions, attack, batch_attack_names, parse_attacks,
                                          suite_names)
from trainers.evaluation.scoring import balanced_accuracy, project_to_threat
from trainers.evaluation.suite import clean_pass, run_batch_attack, run_suite

ATTACK_NAMES = suite_names()
BATCH_ATTACKS = [n for n in batch_attack_names() if n in ATTACK_NAMES]  # what `--attacks all` runs per batch

EPS = {LINF: 0.1, L2: 0.5}
SLACK = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, num_classes))


def tiny_data(model, n=24, num_classes=10, seed=1, wrong=4):
    """Inputs in [0, 1] labelled by the model itself, with the first `wrong` labels changed (clean errors)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    model.train(was)
    y[:wrong] = (y[:wrong] + 1) % num_classes
    return x, y


def batches_of(x, y, size):
    return lambda: [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def settings_for(norm, **kw):
    threat = ThreatModel(eps=EPS[norm], norm=norm, step_size=EPS[norm] / 4, steps=10)
    return EvalSettings(threat=threat, seed=3, show_progress=False, **kw)


def threat(eps, norm):
    return ThreatModel(eps=eps, step_size=0.0, steps=0, norm=norm)


@pytest.mark.parametrize("norm", [LINF, L2])
@pytest.mark.parametrize("name", sorted(BATCH_ATTACKS))
def test_raw_attack_output_stays_in_the_ball_and_the_box(name, norm):
    model = tiny_model().eval()
    x, y = tiny_data(model)
    s = settings_for(norm)
    x_adv = attack(name).make(model, s, attack(name).options())(x, y).detach()
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert float(perturbation_norms(x_adv, x, norm).max()) <= s.eps * (1 + SLACK) + SLACK
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # The attacks do something (a no-op would trivially satisfy the bounds).
    assert float(perturbation_norms(x_adv, x, norm).max()) > 0.25 * s.eps


def test_linf_fgsm_matches_trainers_fgsm():
    model = tiny_model().eval()
    x, y = tiny_data(model)
    s = settings_for(LINF)
    assert torch.equal(attack("fgsm").make(model, s, NoOptions())(x, y), fgsm(model, x, y, s.threat))


@pytest.mark.parametrize("norm", [LINF, L2])
def test_project_to_threat(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 4, generator=g)
    far = x + 3 * torch.randn(5, 3, 4, 4, generator=g)
    out = project_to_threat(far, x, threat(0.2, norm))
    assert float(perturbation_norms(out, x, norm).max()) <= 0.2 * (1 + SLACK)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    inside = project_to_threat(x + 0.01 * torch.sign(torch.randn(5, 3, 4, 4, generator=g)), x, threat(0.2, LINF))
    assert torch.allclose(inside, (x + 0.01 * torch.sign(inside - x)).clamp(0, 1), atol=1e-7)


@pytest.mark.parametrize("norm", [LINF, L2])
def test_robust_accuracy_never_exceeds_natural(norm):
    model = tiny_model().eval()
    x, y = tiny_data(model, n=30, wrong=8)
    result = run_suite(model, batches_of(x, y, 7), [n for n in ATTACK_NAMES if n != "autoattack"], settings_for(norm),
                       num_batches=5)
    assert result["n"] == 30
    assert result["natural_acc"] == pytest.approx(100 * 22 / 30)
    assert set(result["attacks"]) == set(BATCH_ATTACKS)
    for name, entry in result["attacks"].items():
        assert entry["robust_acc"] <= result["natural_acc"] + 1e-9, name
        assert entry["eps"] == EPS[norm] and entry["norm"] == norm
        assert entry["max_perturbation"] <= EPS[norm] * (1 + SLACK) + SLACK
        assert "steps" in entry and "restarts" in entry and "seconds" in entry
    assert result["attacks"]["pgd50"]["steps"] == 50 and result["attacks"]["cw"]["kappa"] == 50
    assert result["attacks"]["apgd"]["restarts"] == 5 and result["attacks"]["apgd"]["steps"] == 50


def test_clean_errors_count_as_not_robust_even_if_an_attack_fixes_them():
    """An 'attack' that returns the label-consistent point would make wrong points right; they stay wrong."""
    model = tiny_model().eval()
    x, y = tiny_data(model, n=12, wrong=12)  # every clean prediction is wrong
    clean = clean_pass(model, batches_of(x, y, 12), show_progress=False)
    assert not clean.correct.any()

    class Identity:
        name = "identity"
        options = NoOptions

        @staticmethod
        def make(model, s, options):
            return lambda a, b: a

        @staticmethod
        def params(s, options):
            return {}

    entry = run_batch_attack(model, Identity, batches_of(x, y, 12), settings_for(LINF), clean)
    assert entry["robust_acc"] == 0.0


@pytest.mark.parametrize("name", sorted(BATCH_ATTACKS))
def test_eval_mode_during_attack_and_modes_restored(name):
    model = tiny_model()
    x, y = tiny_data(model)
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training)) for m in model.modules()]
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    result = run_suite(model, batches_of(x, y, 12), [name], settings_for(LINF), num_batches=2)
    for h in hooks:
        h.remove()
    assert seen and not any(seen), "a module ran in training mode during the evaluation"
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert name in result["attacks"]


def test_same_seed_same_numbers():
    model = tiny_model().eval()
    x, y = tiny_data(model, n=30)
    attacks = ["natural", "pgd10", "cw", "apgd"]
    a = run_suite(model, batches_of(x, y, 16), attacks, settings_for(LINF), epsilons=[0.05, 0.2])
    b = run_suite(model, batches_of(x, y, 16), attacks, settings_for(LINF), epsilons=[0.05, 0.2])

    def strip(r):
        r = {k: v for k, v in r.items() if "seconds" not in k}
        r["attacks"] = {n: {k: v for k, v in e.items() if k != "seconds"} for n, e in r["attacks"].items()}
        r["security_curve"] = [{k: v for k, v in p.items() if k != "seconds"} for p in r["security_curve"]]
        return r

    assert strip(a) == strip(b)
    assert [p["eps"] for p in a["security_curve"]] == [0.05, 0.2]
    assert a["security_curve"][0]["step_size"] == pytest.approx(0.05 / 4)
    assert a["security_curve"][0]["robust_acc"] >= a["security_curve"][1]["robust_acc"]


def test_parse_attacks():
    assert parse_attacks("all") == list(ATTACK_NAMES)
    assert parse_attacks("autoattack,natural, PGD10") == ["natural", "pgd10", "autoattack"]
    with pytest.raises(UserError) as info:
        parse_attacks("pgd10,pgd7")
    message = str(info.value)
    assert "pgd7" in message and all(name in message for name in ATTACK_NAMES)
    with pytest.raises(UserError):
        parse_attacks(" , ")


def test_balanced_accuracy_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    assert balanced_accuracy(y, p) == pytest.approx(100 * balanced_accuracy_score(y.numpy(), p.numpy()))


def test_balanced_accuracy_reported_when_asked():
    model = tiny_model().eval()
    x, y = tiny_data(model, n=20)
    r = run_suite(model, batches_of(x, y, 10), ["pgd10"], settings_for(LINF, balanced=True))
    assert "natural_balanced_acc" in r and "balanced_acc" in r["attacks"]["pgd10"]


def test_model_sparsity_masked_and_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        model[0].weight[:2] = 0
    plain = model_sparsity(model)
    assert plain["total"] == 36 + 1440 and plain["kept"] == 18 + 1440
    assert plain["per_layer"]["0"]["keep"] == 0.5 and plain["sparsity"] == pytest.approx(1 - plain["global_keep"])
    sparsify(model, "weight", keep_min=0.01)
    freeze_masks(model)
    masked = model_sparsity(model)
    assert masked["counted"] == "masks" and set(masked["per_layer"]) == {"0", "2"}
    assert masked["kept"] == sum(v["kept"] for v in masked["per_layer"].values())
    assert masked["global_keep"] == masked["kept"] / masked["total"]
