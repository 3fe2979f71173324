"""Search for per-layer keep ratios under a parameter or FLOPs budget (Heracles, Zhao et al., AutoML 2022).

Heracles searches a non-uniform weight-pruning strategy (one keep ratio per layer) for an adversarially
pre-trained network, then hands it to Hydra / R-ADMM / HARP as their per-layer starting rates. Its agent
is AMC's DDPG (He et al., "AMC", ECCV 2018); its reward ("acc+aa") is the clean plus PGD-10 accuracy of the
magnitude-masked, NOT fine-tuned network on a 5k held-out part of the training set. Here the reward is a
callback, ``reward_fn({layer name: keep}) -> float``, so this module knows no data, attack or model.

The budget. With c_l the cost of layer l (its weight count, ``cost='params'``, or its dense FLOPs,
``cost='flops'``; under weight pruning a layer keeping a fraction k of its weights keeps about k of its
multiply-adds) every strategy the search evaluates satisfies

    sum_l c_l * k_l <= budget * sum_l c_l,   lower_l <= k_l <= upper_l,

on the continuous rates (a mask keeps n - floor((1 - k) n) weights, i.e. at most one more per layer).
Heracles' weight bounds are [0.01, 0.8]; ``budget * sum c`` must be at least ``sum c_l lower_l``.

Methods (``method=``):

- ``'ddpg'``: AMC/Heracles' agent. One episode visits the layers in order; for layer t the actor maps an
  11-feature state (index, c_in, c_out, h, w, stride, kernel, FLOPs, each min-max normalised over the
  layers; then the cost already removed by layers < t and the cost of layers > t, as fractions of the
  total, and the previous layer's keep ratio) to an action a in [0, 1], keep = lower + a (upper - lower).
  The action wall of AMC keeps the budget: the keep ratio is cut to what the budget leaves when every
  later layer takes its lower bound, so the episode can always finish within the budget. The first
  ``warmup`` episodes act uniformly at random; later ones sample a normal truncated to [0, 1] around the
  actor's output, sigma = 0.5 * 0.99^(episode - warmup). Every transition of an episode gets the
  episode's reward (minus a moving-average baseline at update time), goes into a replay buffer, and
  after each episode past the warm-up the critic (TD target with discount 1, as Heracles) and the actor
  (maximise Q) take ``updates_per_episode`` Adam steps on replayed batches, with soft (tau) target updates.
  The wall favours early layers: at a tight budget, random warm-up actions spend the budget before the last
  layers are reached, so a small late layer (the classifier) sits at its lower bound in nearly every
  episode and the agent never sees what keeping it is worth (Heracles' own 001_* lists end in a run of
  lower bounds). Prefer ``'evolution'`` when the last layers matter.
- ``'random'``: each episode draws every keep ratio uniformly in its bounds and projects the draw onto
  the budget (below).
- ``'evolution'``: a steady-state (mu + 1) evolution strategy. The first ``population`` episodes are random
  draws; then each episode mutates the better of two random members (every ratio times exp(sigma * z),
  z ~ N(0, 1)), projects the child onto the budget and replaces the worst member if the child is better.

The projection (random and evolution). A draw k in the bounds is moved onto the budget by scaling every
layer's excess over its lower bound by one common factor s >= 0, capped at the upper bound:
k'_l = min(upper_l, lower_l + s (k_l - lower_l)), with s chosen by bisection so that the cost equals the
budget (or s = inf when even that cannot reach the budget). Unlike a Euclidean projection, which takes
the most from the largest layers whatever was drawn, it keeps the draw's relative pattern (a layer drawn
high stays high), and unlike AMC's sequential wall it does not starve the last layers; s > 1 fills a
draw that is under the budget, so every strategy compared spends the same budget.
"""
import csv
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import truncnorm

from configs.errors import UserError
from pruning.graph import inspect_layers
from pruning.wrap import prunable_layers
from utils.modes import eval_mode

__all__ = ["METHODS", "COSTS", "SearchLayer", "DDPGConfig", "EvolutionConfig", "SearchResult", "describe_layers",
           "project_to_budget", "search_strategy"]

logger = logging.getLogger(__name__)

METHODS = ("ddpg", "random", "evolution")
COSTS = ("params", "flops")
Bounds = Union[Tuple[float, float], Mapping[str, Tuple[float, float]]]
Reward = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class SearchLayer:
    """One prunable layer as the search sees it (the static part of Heracles' per-layer state)."""

    name: str
    params: int      # weights of the layer
    flops: float     # dense FLOPs for one example (2 x multiply-accumulates, pruning.graph's count)
    c_in: int
    c_out: int
    h: int           # input feature-map height (1 for a linear layer)
    w: int           # input feature-map width (1 for a linear layer)
    stride: int      # 0 for a linear layer, as Heracles
    kernel: int      # 1 for a linear layer


@dataclass
class DDPGConfig:
    """The DDPG agent's settings. Defaults are small; Heracles' values are in the comments."""

    hidden: int = 64                  # units in both hidden layers of actor and critic (Heracles 300)
    actor_lr: float = 1e-4            # Adam (Heracles 1e-4)
    critic_lr: float = 1e-3           # Adam (Heracles 1e-3)
    tau: float = 0.01                 # soft target update (Heracles 0.01)
    discount: float = 1.0             # TD discount (Heracles 1.0)
    warmup: int = 10                  # episodes of uniformly random actions (Heracles 100)
    updates_per_episode: int = 20     # actor/critic steps after each later episode (Heracles 20)
    batch_size: int = 64              # transitions per step (Heracles 128)
    memory_episodes: int = 200        # replay capacity in episodes (Heracles 200)
    sigma: float = 0.5                # exploration noise at the end of the warm-up (Heracles 0.5)
    sigma_decay: float = 0.99         # per episode (Heracles 0.99)
    baseline_alpha: float = 0.5       # moving-average reward baseline (AMC/Heracles 0.5)


@dataclass
class EvolutionConfig:
    population: int = 8               # members kept; the first `population` episodes are random draws
    mutation: float = 0.3             # sigma of the log-space mutation (0.3: a ratio moves by ~35 %)


@dataclass
class SearchResult:
    """The best strategy found and one row per episode (``write_csv`` writes them, one column per layer)."""

    best: Dict[str, float]
    best_reward: float
    best_episode: int                 # 1-based
    history: List[Dict[str, object]] = field(default_factory=list)

    def write_csv(self, path) -> None:
        """Heracles' ``Episode_wise_Rewards.csv`` as a proper CSV: episode, reward, cost, ..., keep.<layer>."""
        columns: Dict[str, None] = {}
        for row in self.history:
            columns.update(dict.fromkeys(row))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(self.history)


def describe_layers(model: nn.Module, example: torch.Tensor) -> List[SearchLayer]:
    """Every prunable (conv/linear) layer of ``model``, in registration order, for one example input.

    FLOPs and weight counts come from ``pruning.graph.inspect_layers`` (the toolkit's one cost model); the
    input feature-map sizes from a second forward pass with pre-hooks, since the graph does not keep them.
    Works on a dense or a masked model; the model's train/eval modes are restored.
    """
    graph = inspect_layers(model, example)
    sizes: Dict[str, Tuple[int, int]] = {}

    def record(name):
        def hook(module, args):
            x = args[0]
            sizes[name] = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else (1, 1)
        return hook

    layers = prunable_layers(model)
    handles = [m.register_forward_pre_hook(record(name)) for name, m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()

    described = []
    for name, module in layers:
        if name not in graph.layers:
            raise ValueError(f"layer {name} never ran on the example input")
        info = graph.layers[name]
        conv = isinstance(module, nn.Conv2d)
        h, w = sizes[name]
        described.append(SearchLayer(
            name=name, params=info.weight_count, flops=info.flops,
            c_in=module.in_channels if conv else module.in_features,
            c_out=module.out_channels if conv else module.out_features,
            h=h, w=w, stride=int(module.stride[0]) if conv else 0, kernel=int(module.kernel_size[0]) if conv else 1))
    return described


def project_to_budget(keep: Sequence[float], costs: Sequence[float], budget: float, lower: Sequence[float],
                      upper: Sequence[float]) -> np.ndarray:
    """Move ``keep`` onto ``sum(costs * k) = budget * sum(costs)`` inside the bounds (see the module docstring).

    Every layer's excess over its lower bound is scaled by one factor s (bisection), capped at its upper
    bound. The result never exceeds the budget; it spends less only when every layer drawn above its lower
    bound already sits at its upper bound. Raises UserError if the lower bounds alone exceed the budget.
    """
    costs, lower, upper = (np.asarray(v, dtype=np.float64) for v in (costs, lower, upper))
    keep = np.clip(np.asarray(keep, dtype=np.float64), lower, upper)
    limit = float(budget) * costs.sum()
    _check_feasible(costs, lower, limit, budget)
    excess = keep - lower

    def spent(s: float) -> float:
        return float((costs * np.minimum(upper, lower + s * excess)).sum())

    saturated = np.where(excess > 0, upper, lower)
    if float((costs * saturated).sum()) <= limit:
        return saturated
    low, high = 0.0, 1.0
    while spent(high) < limit:
        high *= 2.0
    for _ in range(64):  # float64 bisection: the bracket shrinks below one ulp of s
        mid = 0.5 * (low + high)
        if spent(mid) <= limit:
            low = mid
        else:
            high = mid
    return np.minimum(upper, lower + low * excess)


def search_strategy(layers: Sequence[SearchLayer], budget: float, reward_fn: Callable[[Dict[str, float]], Reward], *,
                    method: str = "ddpg", episodes: int = 100, seed: int = 0, bounds: Bounds = (0.01, 0.8),
                    cost: str = "params", ddpg: Optional[DDPGConfig] = None,
                    evolution: Optional[EvolutionConfig] = None,
                    on_episode: Optional[Callable[[Dict[str, object]], None]] = None) -> SearchResult:
    """Search a keep ratio per layer that maximises ``reward_fn`` within the budget.

    Args:
        layers: the prunable layers (``describe_layers``), in the order the agent visits them.
        budget: kept fraction of the total cost, in (0, 1] (e.g. the target ``--k``).
        reward_fn: called once per episode with ``{layer name: keep}``; returns the reward, or a mapping with
            key ``'reward'`` whose other numeric entries (e.g. clean and PGD accuracy) go into the history.
        method: ``'ddpg'``, ``'random'`` or ``'evolution'``.
        episodes: reward evaluations in total (DDPG: warm-up included).
        seed: seeds every random choice of the search (and the DDPG networks' init); ``reward_fn``'s own
            randomness (e.g. PGD's random start) is the caller's.
        bounds: ``(lower, upper)`` for every layer, or ``{name: (lower, upper)}`` for each layer.
        cost: ``'params'`` or ``'flops'``: what the budget counts.
        ddpg, evolution: settings of those methods (defaults: ``DDPGConfig()``, ``EvolutionConfig()``).
        on_episode: called with each history row as soon as its episode ends (progress, incremental CSV).

    Returns the best strategy, its reward and episode, and one history row per episode.
    """
    if method not in METHODS:
        raise UserError(f"unknown search method {method!r}; expected one of {', '.join(METHODS)}")
    if episodes < 1:
        raise UserError(f"the search needs at least one episode, got {episodes}")
    problem = _Problem.build(layers, budget, bounds, cost)
    rng = np.random.default_rng(seed)
    record = _Recorder(problem, reward_fn, method, on_episode)
    if method == "random":
        for _ in range(episodes):
            record(problem.project(rng.uniform(problem.lower, problem.upper)), "random")
            record.finish()
    elif method == "evolution":
        _evolve(problem, record, rng, episodes, evolution or EvolutionConfig())
    else:
        _DDPGSearch(problem, record, rng, seed, ddpg or DDPGConfig()).run(episodes)
    return record.result()


# ----------------------------------------------------------------------------------------------- problem


@dataclass
class _Problem:
    names: List[str]
    costs: np.ndarray          # per layer, float64
    lower: np.ndarray
    upper: np.ndarray
    budget: float              # fraction of the total
    limit: float               # budget * total cost
    static_features: np.ndarray  # [layers, 8], min-max normalised

    @classmethod
    def build(cls, layers: Sequence[SearchLayer], budget: float, bounds: Bounds, cost: str) -> "_Problem":
        if not layers:
            raise UserError("no prunable layers to search keep ratios for")
        if cost not in COSTS:
            raise UserError(f"unknown search cost {cost!r}; expected one of {', '.join(COSTS)}")
        budget = float(budget)
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise UserError(f"the search budget must be a kept fraction in (0, 1], got {budget:g}")
        names = [layer.name for layer in layers]
        if isinstance(bounds, Mapping):
            missing = [n for n in names if n not in bounds]
            if missing:
                raise UserError(f"search bounds missing for layers {missing[:4]}")
            pairs = [bounds[n] for n in names]
        else:
            pairs = [bounds] * len(names)
        lower = np.array([float(p[0]) for p in pairs])
        upper = np.array([float(p[1]) for p in pairs])
        bad = [n for n, lo, hi in zip(names, lower, upper) if not (0.0 < lo <= hi <= 1.0)]
        if bad:
            raise UserError(f"search bounds must satisfy 0 < lower <= upper <= 1; not so for {bad[:4]}")
        costs = np.array([float(layer.params if cost == "params" else layer.flops) for layer in layers])
        if not (costs > 0).all():
            raise UserError(f"every layer needs a positive {cost} count to be searched")
        limit = budget * costs.sum()
        _check_feasible(costs, lower, limit, budget)
        static = np.array([[i, l.c_in, l.c_out, l.h, l.w, l.stride, l.kernel, l.flops] for i, l in enumerate(layers)],
                          dtype=np.float64)
        span = static.max(axis=0) - static.min(axis=0)
        # Min-max normalised per feature, as Heracles; a feature that is the same for every layer carries no
        # information and becomes 0 (Heracles left it unscaled, e.g. kernel = 3).
        static = np.where(span > 0, (static - static.min(axis=0)) / np.where(span > 0, span, 1.0), 0.0)
        return cls(names, costs, lower, upper, budget, limit, static)

    def project(self, keep: np.ndarray) -> np.ndarray:
        return project_to_budget(keep, self.costs, self.budget, self.lower, self.upper)

    def cost_fraction(self, keep: np.ndarray) -> float:
        return float((self.costs * keep).sum() / self.costs.sum())


def _check_feasible(costs: np.ndarray, lower: np.ndarray, limit: float, budget: float) -> None:
    floor = float((costs * lower).sum())
    if floor > limit * (1.0 + 1e-12):
        raise UserError(f"budget {budget:g} is below what the lower bounds allow: every layer at its lower bound "
                        f"already keeps {floor / costs.sum():.4g} of the cost; lower the bounds or raise the budget")


class _Recorder:
    """Evaluates strategies, keeps the best, and writes one history row per episode."""

    def __init__(self, problem: _Problem, reward_fn, method: str, on_episode):
        self.problem, self.reward_fn, self.method, self.on_episode = problem, reward_fn, method, on_episode
        self.history: List[Dict[str, object]] = []
        self.best: Optional[np.ndarray] = None
        self.best_reward, self.best_episode = -math.inf, 0
        self._started = time.perf_counter()

    def __call__(self, keep: np.ndarray, phase: str, **info) -> float:
        """Evaluate one episode's strategy; returns its reward. ``finish`` closes the row."""
        strategy = {name: float(k) for name, k in zip(self.problem.names, keep)}
        start = time.perf_counter()
        outcome = self.reward_fn(dict(strategy))
        reward_seconds = time.perf_counter() - start
        extras = {}
        if isinstance(outcome, Mapping):
            if "reward" not in outcome:
                raise ValueError("reward_fn returned a mapping without a 'reward' entry")
            extras = {k: float(v) for k, v in outcome.items() if k != "reward"}
            outcome = outcome["reward"]
        reward = float(outcome)
        if not math.isfinite(reward):
            raise ValueError(f"reward_fn returned {reward} for {strategy}")
        episode = len(self.history) + 1
        if reward > self.best_reward:
            self.best, self.best_reward, self.best_episode = keep.copy(), reward, episode
            logger.info("%s episode %d: new best reward %.4f", self.method, episode, reward)
        row = {"episode": episode, "method": self.method, "phase": phase, "reward": reward,
               "best_reward": self.best_reward, "cost_fraction": self.problem.cost_fraction(keep),
               **info, **extras, "reward_seconds": reward_seconds}
        row.update({f"keep.{name}": k for name, k in strategy.items()})
        self.history.append(row)
        return reward

    def finish(self) -> None:
        """Close the latest row: its wall time includes the agent's work after the reward (DDPG updates)."""
        now = time.perf_counter()
        row = self.history[-1]
        row["seconds"] = now - self._started
        self._started = now
        if self.on_episode is not None:
            self.on_episode(dict(row))

    def result(self) -> SearchResult:
        best = {name: float(k) for name, k in zip(self.problem.names, self.best)}
        return SearchResult(best, self.best_reward, self.best_episode, self.history)


# --------------------------------------------------------------------------------------------- evolution


def _evolve(problem: _Problem, record: _Recorder, rng: np.random.Generator, episodes: int,
            config: EvolutionConfig) -> None:
    if config.population < 2:
        raise UserError(f"the evolution needs a population of at least 2, got {config.population}")
    population: List[Tuple[float, np.ndarray]] = []
    for _ in range(episodes):
        if len(population) < config.population:
            keep = problem.project(rng.uniform(problem.lower, problem.upper))
            population.append((record(keep, "init"), keep))
        else:
            first, second = rng.choice(len(population), size=2, replace=False)
            parent = max(population[first], population[second], key=lambda member: member[0])[1]
            child = parent * np.exp(config.mutation * rng.standard_normal(parent.shape))
            child = problem.project(np.clip(child, problem.lower, problem.upper))
            reward = record(child, "evolve")
            worst = min(range(len(population)), key=lambda i: population[i][0])
            if reward > population[worst][0]:
                population[worst] = (reward, child)
        record.finish()


# -------------------------------------------------------------------------------------------------- DDPG

_STATE_DIM = 11  # 8 static features + cost removed so far, cost still to come, previous keep ratio


class _Actor(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(_STATE_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())
        _small_init(self.net[4])

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class _Critic(nn.Module):
    """Q(s, a): state and action enter through separate layers that are summed (AMC/Heracles' critic)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.state_in = nn.Linear(_STATE_DIM, hidden)
        self.action_in = nn.Linear(1, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        _small_init(self.head[3])

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.state_in(state) + self.action_in(action))


def _small_init(layer: nn.Linear) -> None:
    """Output layers start near zero (uniform +-3e-3, Lillicrap et al. 2016, as AMC) so early Q and actions
    are not saturated."""
    nn.init.uniform_(layer.weight, -3e-3, 3e-3)
    nn.init.uniform_(layer.bias, -3e-3, 3e-3)


class _Replay:
    """Ring buffer of transitions (state, action, reward, next state, done)."""

    def __init__(self, capacity: int):
        self.states = np.zeros((capacity, _STATE_DIM), dtype=np.float32)
        self.next_states = np.zeros((capacity, _STATE_DIM), dtype=np.float32)
        self.actions = np.zeros((capacity, 1), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.size, self.next = capacity, 0, 0

    def add(self, state, action, reward, next_state, done) -> None:
        i = self.next
        self.states[i], self.actions[i, 0], self.rewards[i] = state, action, reward
        self.next_states[i], self.dones[i] = next_state, float(done)
        self.next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int) -> Tuple[torch.Tensor, ...]:
        # Without replacement once the buffer is big enough; before that, with replacement.
        idx = rng.choice(self.size, size=batch, replace=self.size < batch)
        return tuple(torch.from_numpy(a[idx]) for a in (self.states, self.actions, self.rewards, self.next_states,
                                                        self.dones))


class _DDPGSearch:
    def __init__(self, problem: _Problem, record: _Recorder, rng: np.random.Generator, seed: int,
                 config: DDPGConfig):
        self.problem, self.record, self.rng, self.config = problem, record, rng, config
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's torch RNG alone
            torch.manual_seed(seed)
            self.actor, self.critic = _Actor(config.hidden), _Critic(config.hidden)
            self.target_actor, self.target_critic = _Actor(config.hidden), _Critic(config.hidden)
        self.target_actor.load_state_dict(self.actor.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.replay = _Replay(config.memory_episodes * len(problem.names))
        self.baseline: Optional[float] = None

    def run(self, episodes: int) -> None:
        if episodes <= self.config.warmup:
            logger.warning("DDPG: %d episodes are all warm-up (random actions); the agent never acts", episodes)
        for episode in range(episodes):
            warm = episode < self.config.warmup
            sigma = 0.0 if warm else self.config.sigma * self.config.sigma_decay ** (episode - self.config.warmup)
            states, actions, keep = self._episode(warm, sigma)
            reward = self.record(keep, "warmup" if warm else "explore", noise_sigma=sigma)
            for t in range(len(states)):
                last = t == len(states) - 1
                self.replay.add(states[t], actions[t], reward, np.zeros(_STATE_DIM) if last else states[t + 1], last)
            if episode + 1 >= self.config.warmup:
                for _ in range(self.config.updates_per_episode):
                    self._update()
            self.record.finish()

    def _episode(self, warm: bool, sigma: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.problem
        n = len(p.names)
        total = p.costs.sum()
        states, actions, keep = np.zeros((n, _STATE_DIM)), np.zeros(n), np.zeros(n)
        committed = removed = 0.0
        previous = 1.0
        for t in range(n):
            later = p.costs[t + 1:]
            states[t] = np.concatenate([p.static_features[t], [removed / total, later.sum() / total, previous]])
            if warm:
                action = self.rng.uniform()
            else:
                with torch.no_grad():
                    mean = float(self.actor(torch.as_tensor(states[t], dtype=torch.float32)))
                action = _truncated_normal(self.rng, mean, sigma)
            wanted = p.lower[t] + action * (p.upper[t] - p.lower[t])
            # AMC's action wall: what the budget leaves for this layer when every later layer keeps its lower
            # bound; never below this layer's own lower bound (feasible by construction, see _check_feasible).
            room = (p.limit - committed - float((later * p.lower[t + 1:]).sum())) / p.costs[t]
            keep[t] = min(wanted, min(p.upper[t], max(p.lower[t], room)))
            span = p.upper[t] - p.lower[t]
            actions[t] = (keep[t] - p.lower[t]) / span if span > 0 else 0.0  # the action actually taken
            committed += p.costs[t] * keep[t]
            removed += p.costs[t] * (1.0 - keep[t])
            previous = keep[t]
        return states, actions, keep

    def _update(self) -> None:
        c = self.config
        states, actions, rewards, next_states, dones = self.replay.sample(self.rng, c.batch_size)
        batch_mean = float(rewards.mean())
        self.baseline = batch_mean if self.baseline is None else (
            self.baseline + c.baseline_alpha * (batch_mean - self.baseline))
        rewards = rewards - self.baseline
        with torch.no_grad():
            next_q = self.target_critic(next_states, self.target_actor(next_states)).squeeze(1)
            target = rewards + c.discount * (1.0 - dones) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(states, actions).squeeze(1), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        with torch.no_grad():
            for net, target_net in ((self.actor, self.target_actor), (self.critic, self.target_critic)):
                for p, tp in zip(net.parameters(), target_net.parameters()):
                    tp.mul_(1.0 - c.tau).add_(p, alpha=c.tau)


def _truncated_normal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """One draw of N(mean, sigma^2) truncated to [0, 1] (AMC's exploration noise)."""
    if sigma <= 0.0:
        return min(max(mean, 0.0), 1.0)
    return float(truncnorm.rvs((0.0 - mean) / sigma, (1.0 - mean) / sigma, loc=mean, scale=sigma, random_state=rng))
