"""Keep-ratio search under a budget (strategies.search): bounds, budget, projection, the three methods
on a synthetic reward with a known optimum, reproducibility, and the layer description of a real model."""
import csv

import numpy as np
import pytest
import torch

import models
from configs.errors import UserError
from pruning.graph import inspect_layers
from strategies.search import DDPGConfig, EvolutionConfig, SearchLayer, describe_layers, project_to_budget, \
    search_strategy

SIZES = (100, 2000, 5000, 8000, 3000, 500)  # weights per layer, 18,600 in total
LAYERS = [SearchLayer(f"l{i}", n, 7.0 * n * (6 - i), 8 * (i + 1), 8 * (i + 2), 16 >> (i // 2), 16 >> (i // 2),
                      1 + i % 2, 3) for i, n in enumerate(SIZES)]
BUDGET = 0.1
FAVOURED = "l1"  # the synthetic reward is this layer's keep ratio; a uniform strategy scores BUDGET
# Heracles' noise (sigma 0.5, decaying 1 % per episode) needs its 300 episodes to fade; in a 40-episode test it
# would hide what the actor learnt, so the tests explore with 0.2.
SMALL_DDPG = DDPGConfig(hidden=64, warmup=10, updates_per_episode=10, batch_size=32, sigma=0.2)


def favour_one_layer(strategy):
    return strategy[FAVOURED]


def _keeps(row):
    return np.array([row[f"keep.{layer.name}"] for layer in LAYERS])


# ------------------------------------------------------------------------------------------- projection


def test_projection_lands_on_the_budget_and_keeps_the_draws_pattern():
    costs = np.array(SIZES, dtype=float)
    lower, upper = np.full(6, 0.01), np.full(6, 0.8)
    rng = np.random.default_rng(0)
    for _ in range(50):
        draw = rng.uniform(0.01, 0.8, size=6)
        keep = project_to_budget(draw, costs, BUDGET, lower, upper)
        assert (keep >= lower).all() and (keep <= upper).all()
        spent = (costs * keep).sum() / costs.sum()
        assert spent <= BUDGET and spent == pytest.approx(BUDGET, rel=1e-9)
        # One common factor on the excess over the lower bound: the order of the draw is kept.
        assert (np.argsort(keep - lower, kind="stable") == np.argsort(draw - lower, kind="stable")).all()


def test_projection_fills_a_draw_under_the_budget_and_saturates_at_the_upper_bounds():
    costs = np.array([10.0, 10.0])
    filled = project_to_budget([0.02, 0.03], costs, 0.5, [0.01, 0.01], [1.0, 1.0])
    assert filled.sum() * 10 == pytest.approx(10.0)  # 0.5 of the cost
    assert filled[1] > filled[0]
    # Even both at their upper bounds spend less than the budget: stay there.
    assert list(project_to_budget([0.5, 0.01], costs, 0.9, [0.01, 0.01], [0.6, 0.6])) == [0.6, 0.01]


def test_projection_rejects_an_infeasible_budget():
    with pytest.raises(UserError, match="below what the lower bounds allow"):
        project_to_budget([0.5, 0.5], [1.0, 1.0], 0.005, [0.01, 0.01], [0.8, 0.8])


# ---------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("method", ["random", "evolution", "ddpg"])
def test_every_episode_respects_bounds_and_budget(method, one_thread):
    bounds = {layer.name: (0.02, 0.5) for layer in LAYERS}
    bounds["l0"] = (0.05, 0.9)
    lower = np.array([bounds[layer.name][0] for layer in LAYERS])
    upper = np.array([bounds[layer.name][1] for layer in LAYERS])
    for cost in ("params", "flops"):
        costs = np.array([layer.params if cost == "params" else layer.flops for layer in LAYERS], dtype=float)
        result = search_strategy(LAYERS, BUDGET, favour_one_layer, method=method, episodes=15, seed=1,
                                 bounds=bounds, cost=cost, ddpg=SMALL_DDPG, evolution=EvolutionConfig(population=4))
        assert len(result.history) == 15
        for row in result.history:
            keep = _keeps(row)
            assert (keep >= lower).all() and (keep <= upper).all()
            assert (costs * keep).sum() / costs.sum() <= BUDGET + 1e-12
            assert row["cost_fraction"] == pytest.approx((costs * keep).sum() / costs.sum())
        assert list(result.best) == [layer.name for layer in LAYERS]


@pytest.mark.parametrize("method, episodes", [("random", 30), ("evolution", 30), ("ddpg", 30)])
def test_search_beats_uniform_on_a_reward_with_a_known_optimum(method, episodes, one_thread):
    uniform = favour_one_layer({layer.name: BUDGET for layer in LAYERS})
    result = search_strategy(LAYERS, BUDGET, favour_one_layer, method=method, episodes=episodes, seed=0,
                             ddpg=SMALL_DDPG)
    assert result.best_reward >= uniform + 0.05
    assert result.best[FAVOURED] == result.best_reward
    assert result.history[result.best_episode - 1]["reward"] == result.best_reward
    assert [row["best_reward"] for row in result.history][-1] == result.best_reward


def test_ddpg_learns_after_its_warm_up(one_thread):
    result = search_strategy(LAYERS, BUDGET, favour_one_layer, method="ddpg", episodes=40, seed=0, ddpg=SMALL_DDPG)
    rewards = [row["reward"] for row in result.history]
    phases = [row["phase"] for row in result.history]
    assert phases[:10] == ["warmup"] * 10 and set(phases[10:]) == {"explore"}
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.1
    sigmas = [row["noise_sigma"] for row in result.history[10:]]
    assert sigmas[0] == 0.2 and sigmas[1] == pytest.approx(0.2 * 0.99)


def test_evolution_improves_on_its_random_start(one_thread):
    result = search_strategy(LAYERS, BUDGET, favour_one_layer, method="evolution", episodes=40, seed=0,
                             evolution=EvolutionConfig(population=8))
    rewards = [row["reward"] for row in result.history]
    assert np.mean(rewards[-10:]) > np.mean(rewards[:8]) + 0.05


@pytest.mark.parametrize("method", ["random", "evolution", "ddpg"])
def test_a_seed_makes_the_search_reproducible(method, one_thread):
    def run(seed):
        result = search_strategy(LAYERS, BUDGET, favour_one_layer, method=method, episodes=14, seed=seed,
                                 ddpg=DDPGConfig(hidden=16, warmup=4, updates_per_episode=3, batch_size=16))
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in result.history]

    torch.manual_seed(123)  # the caller's torch RNG state must not matter ...
    first = run(5)
    state = torch.get_rng_state()
    second = run(5)
    assert first == second
    assert torch.equal(state, torch.get_rng_state())  # ... nor be consumed by the search
    assert run(6) != first


def test_reward_mappings_add_columns_and_the_history_writes_as_csv(tmp_path):
    seen = []

    def reward(strategy):
        return {"reward": strategy["l0"] + strategy["l5"], "natural": 90.0, "pgd": strategy["l0"] * 10}

    result = search_strategy(LAYERS, BUDGET, reward, method="random", episodes=3, seed=0, on_episode=seen.append)
    assert [row["episode"] for row in seen] == [1, 2, 3]
    assert all(row["seconds"] >= row["reward_seconds"] >= 0 for row in seen)
    path = tmp_path / "episodes.csv"
    result.write_csv(path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3
    assert {"episode", "reward", "best_reward", "cost_fraction", "natural", "pgd", "keep.l0", "keep.l5"} <= set(rows[0])
    assert float(rows[1]["pgd"]) == pytest.approx(10 * float(rows[1]["keep.l0"]))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "bayes"}, "unknown search method 'bayes'"),
    ({"episodes": 0}, "at least one episode"),
    ({"bounds": (0.2, 0.8)}, "below what the lower bounds allow"),
    ({"bounds": (0.5, 0.2)}, "0 < lower <= upper <= 1"),
    ({"bounds": {"l0": (0.01, 0.8)}}, "bounds missing for layers"),
    ({"cost": "latency"}, "unknown search cost"),
])
def test_bad_search_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        search_strategy(LAYERS, BUDGET, favour_one_layer, **{"method": "random", "episodes": 2, **kwargs})
    with pytest.raises(UserError, match="budget must be a kept fraction"):
        search_strategy(LAYERS, 1.5, favour_one_layer, method="random")


def test_describe_layers_of_the_digits_model(one_thread):
    model = models.create_model("small_cnn", num_classes=10, in_channels=1)
    example = torch.zeros(1, 1, 8, 8)
    layers = describe_layers(model, example)
    graph = inspect_layers(model, example)
    assert [layer.name for layer in layers] == ["features.0", "features.3", "features.6", "classifier.0",
                                                "classifier.2"]
    by_name = {layer.name: layer for layer in layers}
    assert by_name["features.0"] == SearchLayer("features.0", 576, graph.layers["features.0"].flops, 1, 64, 8, 8, 1, 3)
    assert (by_name["features.3"].h, by_name["features.3"].stride, by_name["features.6"].h) == (8, 2, 4)
    fc = by_name["classifier.0"]
    assert (fc.c_in, fc.c_out, fc.h, fc.w, fc.stride, fc.kernel, fc.params) == (1024, 256, 1, 1, 0, 1, 1024 * 256)
    assert fc.flops == 2 * 1024 * 256
    assert model.training  # modes restored
