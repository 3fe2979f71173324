"""AutoAttack composition (trainers/evaluation/autoattack.py): survivors only, per-point worst case, official settings."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.attacks.threat import LINF, L2, ThreatModel, perturbation_norms
from trainers.evaluation.autoattack import (AutoAttackOptions, Component, build_components, run_autoattack,
                                           target_classes)
from trainers.evaluation.registry import EvalSettings
from trainers.evaluation.suite import run_suite


def threat(eps, norm):
    return ThreatModel(eps=eps, step_size=eps / 4, steps=10, norm=norm)

C = 5
EPS = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ a model whose answers we control
class LookupModel(nn.Module):
    """Pixel 0 encodes the example id (id / 1000); the model answers table[id] while pixel 1 is below 0.5 and
    the next class once an 'attack' pushes pixel 1 above it."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.modes_seen = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        ids = (x[:, 0, 0, 0] * 1000).round().long()
        label = self.table[ids]
        pred = torch.where(x[:, 0, 0, 1] > 0.5, (label + 1) % C, label)
        return 10 * F.one_hot(pred, C).float() + self.dummy


def ids_of(x):
    return (x[:, 0, 0, 0] * 1000).round().long().tolist()


class Fooler:
    """A fake component that breaks exactly the ids in `fool` (pushing pixel 1 by `push`) and logs its calls."""

    def __init__(self, fool, push=0.45):
        self.fool, self.push, self.calls = set(fool), push, []

    def __call__(self, x, y):
        ids = ids_of(x)
        self.calls.append(ids)
        out = x.clone()
        for j, i in enumerate(ids):
            if i in self.fool:
                out[j, 0, 0, 1] += self.push
        return out


def lookup_setup(n=23, wrong=(0, 5, 9)):
    labels = torch.arange(n) % C
    table = labels.clone()
    table[list(wrong)] = (table[list(wrong)] + 2) % C  # clean errors
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n) / 1000
    x[:, 0, 0, 1] = 0.2
    return LookupModel(table), x, labels


def make_batches(x, y, size):
    return lambda: [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_later_components_see_only_points_still_robust_and_result_is_the_worst_case():
    model, x, y = lookup_setup()
    fools = [Fooler({1, 2, 3, 5}), Fooler({3, 4, 10, 11}), Fooler({12}), Fooler(set())]
    components = [Component(f"c{i}", f) for i, f in enumerate(fools)]
    model.train()
    result = run_autoattack(model, make_batches(x, y, 4), components, threat(EPS, LINF), batch_size=3,
                            show_progress=False, keep_adversarial=True)
    clean_ok = set(range(23)) - {0, 5, 9}
    still = set(clean_ok)
    for f in fools:
        got = [i for call in f.calls for i in call]
        assert sorted(got) == sorted(still), "a component saw a point that was already broken or wrong"
        assert all(len(call) <= 3 for call in f.calls)
        still -= f.fool
    assert set(torch.nonzero(result.robust).flatten().tolist()) == still
    assert result.clean_acc == pytest.approx(100 * 20 / 23)
    accs = [result.per_component[f"c{i}"]["robust_acc"] for i in range(4)]
    assert accs == pytest.approx([100 * 17 / 23, 100 * 14 / 23, 100 * 13 / 23, 100 * 13 / 23])
    assert result.robust_acc == accs[-1]
    assert [result.per_component[f"c{i}"]["broken"] for i in range(4)] == [3, 3, 1, 0]
    # The worst prediction found is recorded for balanced accuracy; clean errors keep their clean prediction.
    assert result.predictions[4].item() == (4 % C + 1) % C and result.predictions[0].item() == model.table[0].item()
    # Eval mode throughout, mode restored.
    assert model.modes_seen and not any(model.modes_seen) and model.training
    # Adversarial examples: broken points moved, the others are the clean inputs.
    assert result.adversarial[4, 0, 0, 1] > 0.5 and torch.equal(result.adversarial[6], x[6])


def test_final_flags_equal_the_per_point_minimum_over_components_run_alone():
    model, x, y = lookup_setup()
    sets = [{1, 2, 3}, {3, 4, 10, 11, 5}, {12, 20}]
    together = run_autoattack(model, make_batches(x, y, 5), [Component(f"c{i}", Fooler(s)) for i, s in enumerate(sets)],
                              threat(EPS, LINF), batch_size=4, show_progress=False)
    alone = [run_autoattack(model, make_batches(x, y, 5), [Component("c", Fooler(s))], threat(EPS, LINF),
                            batch_size=4, show_progress=False).robust for s in sets]
    assert torch.equal(together.robust, alone[0] & alone[1] & alone[2])


def test_out_of_budget_outputs_are_projected_before_scoring(caplog):
    model, x, y = lookup_setup()

    def overshoot(xb, yb):  # moves pixel 1 by 0.9 > eps and another pixel below 0: projection must fix both
        out = xb.clone()
        out[:, 0, 0, 1] += 0.9
        out[:, 0, 1, 1] -= 0.7
        return out

    with caplog.at_level(logging.WARNING):
        result = run_autoattack(model, make_batches(x, y, 8), [Component("big", overshoot)], threat(0.2, LINF),
                                batch_size=8, show_progress=False, keep_adversarial=True)
    assert "projected" in caplog.text
    assert result.robust_acc == pytest.approx(100 * 20 / 23)  # 0.2 + 0.2 = 0.4 < 0.5: nothing breaks in-budget
    assert float(perturbation_norms(result.adversarial, x, LINF).max()) <= 0.2 + 1e-6
    assert float(result.adversarial.min()) >= 0.0


# ------------------------------------------------------------------------------ the real torchattacks components
def tiny_model(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)).eval()


def tiny_data(model, n, seed=1, wrong=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:wrong] = (y[:wrong] + 1) % model[-1].out_features
    return x, y


def test_standard_preset_has_the_official_settings():
    comps = {c.name: c.params for c in build_components(tiny_model(), "standard", threat(8 / 255, LINF),
                                                         num_classes=10, seed=0)}
    assert list(comps) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert comps["apgd-ce"]["steps"] == 100 and comps["apgd-ce"]["restarts"] == 1 and comps["apgd-ce"]["loss"] == "ce"
    assert comps["apgd-t"]["steps"] == 100 and comps["apgd-t"]["target_classes"] == 9
    assert comps["fab-t"]["steps"] == 100 and comps["fab-t"]["target_classes"] == 9 and comps["fab-t"]["targeted"]
    assert comps["square"]["queries"] == 5000 and comps["square"]["resc_schedule"] is False
    assert comps["square"]["p_init"] == 0.8
    assert target_classes(100) == 9 and target_classes(10) == 9 and target_classes(5) == 4


def test_original_preset_is_torchattacks_autoattack():
    comps = {c.name: c.params for c in build_components(tiny_model(100), "original", threat(0.031, LINF),
                                                         num_classes=100, seed=0)}
    assert list(comps) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert comps["apgd-ce"]["steps"] == 10 and comps["apgd-t"]["steps"] == 10 and comps["fab-t"]["steps"] == 10
    assert comps["apgd-t"]["target_classes"] == 9 and comps["fab-t"]["target_classes"] == 9
    assert comps["square"]["resc_schedule"] is True and comps["square"]["queries"] == 5000


def test_fewer_than_four_classes_skip_apgd_t(caplog):
    model = tiny_model(3)
    x, y = tiny_data(model, 10)
    with caplog.at_level(logging.WARNING):
        comps = build_components(model, "standard", threat(0.05, LINF), num_classes=3, seed=0)
    assert [c.name for c in comps] == ["apgd-ce", "fab-t", "square"]
    assert "apgd-t" in caplog.text and comps[1].params["target_classes"] == 2
    result = run_autoattack(model, make_batches(x, y, 10), comps, threat(0.05, LINF), batch_size=10,
                            show_progress=False)
    assert result.robust_acc <= result.clean_acc


def test_targeted_components_attack_the_top_nine_classes_by_clean_logits(monkeypatch):
    """With 100 classes, APGD-T and FAB-T target exactly the 9 highest-scoring wrong classes of each point."""
    import torchattacks

    model = tiny_model(100, seed=2)
    x, y = tiny_data(model, 3, wrong=0)
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    expected = [set(ranked[i, 1:10].tolist()) for i in range(3)]
    apgdt_targets, fab_targets = [set() for _ in range(3)], [set() for _ in range(3)]
    original_dlr = torchattacks.APGDT.dlr_loss_targeted
    original_fab = torchattacks.FAB.get_diff_logits_grads_batch_targeted

    def dlr(self, logits, labels, y_target):
        if logits.shape[0] == 3:
            for i, t in enumerate(y_target.tolist()):
                apgdt_targets[i].add(t)
        return original_dlr(self, logits, labels, y_target)

    def fab(self, imgs, la, la_target):
        if imgs.shape[0] == 3:
            for i, t in enumerate(la_target.tolist()):
                fab_targets[i].add(t)
        return original_fab(self, imgs, la, la_target)

    monkeypatch.setattr(torchattacks.APGDT, "dlr_loss_targeted", dlr)
    monkeypatch.setattr(torchattacks.FAB, "get_diff_logits_grads_batch_targeted", fab)
    comps = {c.name: c for c in build_components(model, "standard", threat(1e-4, LINF), num_classes=100, seed=0)}
    for name in ("apgd-t", "fab-t"):
        comp = comps[name]
        comp.attack.steps = 3  # targets do not depend on the number of steps; keep the test fast
        run_autoattack(model, make_batches(x, y, 3), [comp], threat(1e-4, LINF), batch_size=3, show_progress=False)
    assert apgdt_targets == expected
    assert fab_targets == expected


@pytest.mark.parametrize("norm,eps", [(LINF, 0.03), (L2, 0.3)])
def test_standard_autoattack_on_a_tiny_model(norm, eps):
    model = tiny_model()
    x, y = tiny_data(model, 16)
    model.train()
    before = [m.training for m in model.modules()]
    comps = build_components(model, "standard", threat(eps, norm), num_classes=10, seed=5)
    result = run_autoattack(model, make_batches(x, y, 6), comps, threat(eps, norm), batch_size=8, seed=5,
                            show_progress=False, keep_adversarial=True)
    assert [m.training for m in model.modules()] == before
    accs = [v["robust_acc"] for v in result.per_component.values()]
    assert list(result.per_component) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip([result.clean_acc] + accs, accs))
    assert result.robust_acc == accs[-1] <= result.clean_acc
    assert result.per_component["apgd-t"]["attacked"] > 0  # later components actually ran
    assert float(perturbation_norms(result.adversarial, x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    assert float(result.adversarial.min()) >= 0 and float(result.adversarial.max()) <= 1
    assert result.max_perturbation <= eps * (1 + 1e-5) + 1e-6
    if norm == L2:
        return
    # Same seed, same flags.
    again = run_autoattack(model, make_batches(x, y, 6), build_components(model, "standard", threat(eps, norm),
                                                                          num_classes=10, seed=5),
                           threat(eps, norm), batch_size=8, seed=5, show_progress=False)
    assert torch.equal(again.robust, result.robust)
    assert [v["robust_acc"] for v in again.per_component.values()] == accs


def test_suite_entry_reports_components_and_is_at_most_pgd():
    model = tiny_model()
    x, y = tiny_data(model, 16)
    settings = EvalSettings(threat=ThreatModel(eps=0.05, norm=LINF, step_size=0.0125, steps=10), seed=0,
                            preset="original", show_progress=False)
    result = run_suite(model, make_batches(x, y, 8), ["natural", "pgd10", "autoattack"], settings,
                       options={"autoattack": AutoAttackOptions(batch_size=16)})
    aa = result["attacks"]["autoattack"]
    assert aa["preset"] == "original" and aa["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert set(aa["per_component"]) == set(aa["components"])
    assert all("seconds" in v and "robust_acc" in v for v in aa["per_component"].values())
    assert aa["robust_acc"] == aa["per_component"]["square"]["robust_acc"]
    assert aa["clean_acc"] == result["natural_acc"]
    assert aa["robust_acc"] <= result["attacks"]["pgd10"]["robust_acc"]


def test_autoattack_points_attacks_only_the_first_points_and_says_how_many():
    model = tiny_model()
    x, y = tiny_data(model, 16)
    settings = EvalSettings(threat=ThreatModel(eps=0.05, norm=LINF, step_size=0.0125, steps=10), seed=0,
                            preset="original", show_progress=False)
    first = 5
    result = run_suite(model, make_batches(x, y, 4), ["natural", "autoattack"], settings,
                       options={"autoattack": AutoAttackOptions(batch_size=16, points=first)})
    aa = result["attacks"]["autoattack"]
    with torch.no_grad():
        clean_correct = int((model(x[:first]).argmax(1) == y[:first]).sum())
    assert aa["points"] == first and result["n"] == 16
    assert aa["clean_acc"] == pytest.approx(100.0 * clean_correct / first)
    assert all(v["attacked"] <= clean_correct for v in aa["per_component"].values())
    assert aa["stderr"] == pytest.approx((aa["robust_acc"] * (100 - aa["robust_acc"]) / first) ** 0.5, abs=1e-9)
