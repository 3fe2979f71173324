"""A reproduction plan: a small YAML grid, expanded into the stage graph pretrain -> prune -> finetune -> test.

    name: harp-cifar10                 # the plan's label (default: the file name)
    result_dir: trained_models         # root of every run, relative to the repository root
    datasets: [CIFAR10]
    archs: [vgg16_bn, resnet18]        # default: the dataset preset's
    objectives: [pgd]                  # an --adv-loss or a --trainer name (default: the preset's)
    seeds: [1, 2, 3]                   # each seed runs in its own subtree <result_dir>/seed<S>/ (default: the
                                       # preset's seed, no subtree)
    methods: [dense, LWM, Hydra, rate, HARP]   # a method label of configs/recipes.py or an exp-mode name
    granularities: {weight: [0.1, 0.05, 0.01], channel: [0.5, 0.25, 0.1]}    # the k values per granularity
    flags:                             # options of the stages, by selector (below)
      pretrain: {epochs: 100}
      prune: {epochs: 20, gamma: 0.01}
      channel: {stg_id: original}
      test: {attacks: "natural,pgd10,autoattack"}
    slurm: {...}                       # reproduction/slurm.py
    collect: {...}                     # reproduction/collect.py

Cells are datasets x archs x objectives x seeds x methods x (granularity, k); an unmasked method (dense) has one cell
per (dataset, arch, objective, seed). A cell's stages follow its exp-mode's recipe back through `starts_from`
(harp_finetune <- harp_prune <- pretrain), then test.py evaluates the cell's mode. A train stage is identified by
its run directory and a test by its result file, both computed from the stage's resolved Config exactly as train.py
and test.py compute them (configs.cli.resolve_config, utils.run_dir), so every cell that needs the same pretrain
shares one stage.

`flags` keys are selectors joined by '+'; a section's options go to every stage that all of its selectors match:
  all                        every stage
  train, test                train.py / test.py stages
  pretrain, prune, finetune  train stages of that recipe stage; with `test`, the tests of such a stage's model
  an exp-mode (harp_prune)   that mode's train stage; with `test`, its test
  weight, channel            the masked stages (and their tests) of cells of that granularity
  a dataset, an arch         the stages of cells of that dataset / architecture
  an objective of the plan   the stages of cells of that objective (`mixtrain+test`: how MixTrain models are tested)
Alternatives of one kind (`prune+finetune`) match either. More specific sections win: each selector weighs all 0,
train/test/granularity/dataset/arch/objective 1, stage 2, exp-mode 3, summed over a key; at equal weight the later
section wins.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import yaml

from configs.cli import resolve_config
from configs.errors import UserError
from configs.recipes import RECIPES, STAGES, canonical_mode
from configs.schema import DATASETS, FLAG, FLOATS, OPTION_BY_NAME, TRISTATE, Config, coerce_value
from trainers.evaluation.ap_protocol import preset_attacks
from trainers.evaluation.report import result_path
from trainers.evaluation.suite import parse_epsilons
from utils.run_dir import checkpoint_path, objective_component, run_dir, source_checkpoint

TRAIN, TEST = "train", "test"
SCRIPTS = {TRAIN: "train.py", TEST: "test.py"}
PLAN_KEYS = ("name", "description", "result_dir", "datasets", "archs", "objectives", "seeds", "methods",
             "granularities", "flags", "slurm", "collect")
GRANULARITIES = ("weight", "channel")
# Options the grid sets, or that would break the chaining, refusal or identity of the plan's runs.
RESERVED = {"dataset": "a grid axis (datasets)", "arch": "a grid axis (archs)", "exp_mode": "set by the methods",
            "k": "a grid axis (granularities)", "prune_reg": "a grid axis (granularities)",
            "seed": "a grid axis (seeds)", "result_dir": "set by result_dir", "exp_name": "set by the grid",
            "skip_finished": "set by the plan", "overwrite": "a plan never deletes runs",
            "resume": "interrupted runs resume by themselves", "source_net": "stages chain by their run directories",
            "evaluate": "not a stage", "results_file": "every test writes its own result file"}
_SELECTOR_WEIGHTS = {"all": 0, "kind": 1, "granularity": 1, "dataset": 1, "arch": 1, "objective": 1, "stage": 2,
                     "mode": 3}


# ----------------------------------------------------------------------------------------------- the plan file
@dataclass(frozen=True)
class Section:
    """One `flags` entry: its selectors and its options."""
    key: str
    selectors: Mapping[str, FrozenSet[str]]       # selector kind -> accepted values
    options: Tuple[Tuple[str, Any], ...]
    weight: int

    def matches(self, node: "NodeInfo") -> bool:
        kinds = self.selectors.get("kind")
        if kinds is None and ("stage" in self.selectors or "mode" in self.selectors):
            kinds = frozenset({TRAIN})  # a stage or mode alone names the training stage
        wanted = {"kind": node.kind, "stage": node.stage, "mode": node.mode, "granularity": node.granularity,
                  "dataset": node.dataset, "arch": node.arch, "objective": node.objective}
        for name, value in wanted.items():
            accepted = kinds if name == "kind" else self.selectors.get(name)
            if accepted is not None and value not in accepted:
                return False
        return True


@dataclass(frozen=True)
class Plan:
    path: str
    name: str
    description: str
    result_dir: str
    datasets: Tuple[str, ...]
    archs: Tuple[Optional[str], ...]               # None: the dataset preset's architecture
    objectives: Tuple[Optional[str], ...]          # None: the preset's objective
    seeds: Tuple[Optional[int], ...]               # None: the preset's seed, no per-seed subtree
    methods: Tuple[str, ...]                       # exp-mode of each method's result
    granularities: Tuple[Tuple[str, Tuple[float, ...]], ...]
    sections: Tuple[Section, ...]
    slurm: Mapping[str, Any] = field(default_factory=dict)
    collect: Mapping[str, Any] = field(default_factory=dict)


def load_plan(path: str, result_dir: Optional[str] = None) -> Plan:
    """Read and check a plan file; `result_dir` replaces the plan's own."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise UserError(f"cannot read plan {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"plan {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"plan {path} must be a mapping (see scripts/plans/digits.yaml)")
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in plan {path}; allowed: {', '.join(PLAN_KEYS)}")
    for required in ("datasets", "methods"):
        if not data.get(required):
            raise UserError(f"plan {path} needs a non-empty `{required}` list")
    from models import list_models  # the architecture registry (imports torch), only once a plan is read

    archs = tuple(list_models())
    methods = tuple(dict.fromkeys(m for name in _listed(data, "methods", path) for m in method_modes(name, path)))
    granularities = _granularities(data.get("granularities") or {}, path)
    if not granularities and any(_masked_chain(m) for m in methods):
        raise UserError(f"plan {path} has pruning methods but no `granularities` (e.g. weight: [0.1, 0.01])")
    seeds = tuple(_listed(data, "seeds", path)) or (None,)
    if any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"plan {path}: seeds must be distinct non-negative integers, got {list(seeds)}")
    arch_names = tuple(_choice(a, archs, "architecture", path) for a in _listed(data, "archs", path)) or (None,)
    datasets = tuple(_choice(d, DATASETS, "dataset", path) for d in _listed(data, "datasets", path))
    objectives = tuple(str(o) for o in _listed(data, "objectives", path))
    return Plan(
        path=path, name=str(data.get("name") or os.path.splitext(os.path.basename(path))[0]),
        description=str(data.get("description") or ""),
        result_dir=os.path.normpath(result_dir or str(data.get("result_dir") or "trained_models")),
        datasets=datasets, archs=arch_names, objectives=objectives or (None,),
        seeds=seeds, methods=methods, granularities=granularities,
        sections=_sections(data.get("flags") or {}, path, archs, objectives),
        slurm=_mapping(data, "slurm", path), collect=_mapping(data, "collect", path))


def _listed(data: Mapping, key: str, path: str) -> List:
    value = data.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (dict, list)) for v in values):
        raise UserError(f"`{key}` in plan {path} must be a list of names or numbers")
    return values


def _mapping(data: Mapping, key: str, path: str) -> Mapping:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"`{key}` in plan {path} must be a mapping")
    return value


def _choice(value: Any, choices: Sequence[str], what: str, path: str) -> str:
    for choice in choices:
        if choice.lower() == str(value).lower():
            return choice
    raise UserError(f"unknown {what} {value!r} in plan {path}; choose from: {', '.join(choices)}")


def method_modes(name: Any, path: str = "the plan") -> List[str]:
    """The exp-mode(s) whose model is a method's result: an exp-mode name as it is ('harp_prune' too), else every
    final recipe whose table label (configs/recipes.py `method`) is `name`, case-insensitively, with or without a
    parenthesised note ('Hydra' and 'Hydra (score)' -> score_finetune)."""
    text = str(name).strip()
    try:
        return [canonical_mode(text)]
    except UserError:
        pass
    wanted = text.lower()
    found = [r.name for r in RECIPES.values()
             if r.final and wanted in (r.method.lower(), r.method.split("(")[0].strip().lower())]
    if not found:
        labels = sorted({r.method for r in RECIPES.values()})
        raise UserError(f"unknown method {text!r} in {path}; use a method ({', '.join(labels)}) or an exp-mode "
                        f"({', '.join(RECIPES)})")
    return found


def stage_chain(mode: str) -> List[str]:
    """The modes a mode's run needs, first to last: harp_finetune -> [pretrain, harp_prune, harp_finetune]."""
    chain = [mode]
    while RECIPES[chain[0]].starts_from is not None:
        chain.insert(0, RECIPES[chain[0]].starts_from)
    return chain


def _masked_chain(mode: str) -> bool:
    return any(RECIPES[m].masked for m in stage_chain(mode))


def _granularities(value: Any, path: str) -> Tuple[Tuple[str, Tuple[float, ...]], ...]:
    if not isinstance(value, dict):
        raise UserError(f"`granularities` in plan {path} must map weight/channel to lists of k")
    out = []
    for name, ks in value.items():
        if name not in GRANULARITIES:
            raise UserError(f"unknown granularity {name!r} in plan {path}; choose from: {', '.join(GRANULARITIES)}")
        ks = ks if isinstance(ks, list) else [ks]
        if any(isinstance(k, bool) or not isinstance(k, (int, float)) for k in ks):
            raise UserError(f"granularity {name} in plan {path}: k must be numbers, got {ks!r}")
        ks = tuple(float(k) for k in ks)
        if not ks or any(not 0 < k <= 1 for k in ks):
            raise UserError(f"granularity {name} in plan {path}: give k values in (0, 1], got {list(ks)}")
        out.append((name, tuple(dict.fromkeys(ks))))
    return tuple(out)


def _sections(value: Any, path: str, archs: Sequence[str], objectives: Sequence[str]) -> Tuple[Section, ...]:
    if not isinstance(value, dict):
        raise UserError(f"`flags` in plan {path} must map selectors to options")
    sections = []
    for key, options in value.items():
        selectors: Dict[str, set] = {}
        for token in str(key).split("+"):
            kind, name = _selector(token.strip(), str(key), path, archs, objectives)
            if kind != "all":
                selectors.setdefault(kind, set()).add(name)
        if len(selectors.get("kind", ())) > 1:
            raise UserError(f"flags key {key!r} in plan {path} names both train and test")
        if not isinstance(options, dict):
            raise UserError(f"flags.{key} in plan {path} must be a mapping of option: value")
        checked = []
        for option, setting in options.items():
            name = str(option).replace("-", "_")
            if name not in OPTION_BY_NAME:
                raise UserError(f"unknown option {option!r} in flags.{key} of plan {path}")
            if name in RESERVED:
                raise UserError(f"option {option!r} in flags.{key} of plan {path} is not allowed: {RESERVED[name]}")
            coerce_value(name, _as_cli_value(name, setting), f"flags.{key} of plan {path}")
            checked.append((name, setting))
        weight = sum(_SELECTOR_WEIGHTS[kind] * len(names) for kind, names in selectors.items())
        sections.append(Section(str(key), {k: frozenset(v) for k, v in selectors.items()}, tuple(checked), weight))
    return tuple(sections)


def _selector(token: str, key: str, path: str, archs: Sequence[str],
              objectives: Sequence[str]) -> Tuple[str, Optional[str]]:
    low = token.lower()
    if low == "all":
        return "all", None
    if low in (TRAIN, TEST):
        return "kind", low
    if low in STAGES:
        return "stage", low
    try:
        return "mode", canonical_mode(token)
    except UserError:
        pass
    if low in GRANULARITIES:
        return "granularity", low
    for kind, names in (("objective", objectives), ("dataset", DATASETS), ("arch", archs)):
        for name in names:
            if name.lower() == low:
                return kind, name
    raise UserError(f"unknown selector {token!r} in flags key {key!r} of plan {path}; use all, train, test, a stage "
                    f"({', '.join(STAGES)}), an exp-mode, weight, channel, a dataset, an architecture or one of "
                    f"the plan's objectives")


# ----------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class NodeInfo:
    """What flag selectors look at."""
    kind: str
    stage: str
    mode: str
    granularity: Optional[str]
    dataset: str
    arch: str
    objective: Optional[str]       # as the plan names it (None: the preset's)


@dataclass(frozen=True)
class Stage:
    """One command of the graph: a train.py run or a test.py evaluation."""
    key: str                       # 'train/<run dir>' or 'test/<result file>', relative to the plan's result_dir
    kind: str                      # TRAIN or TEST
    mode: str                      # the exp-mode trained, or evaluated
    stage: str                     # the recipe's stage ('pretrain', 'prune', 'finetune') or 'test'
    label: str                     # 'harp_prune CIFAR10 vgg16_bn pgd weight k=0.01'
    argv: Tuple[str, ...]          # the script's arguments
    cfg: Config                    # as the script resolves argv
    run_dir: str                   # the run trained, or evaluated
    deps: Tuple[str, ...]          # keys of the stages that must finish first
    result: Optional[str] = None   # test: the result JSON test.py writes
    checkpoint: Optional[str] = None  # test: the checkpoint it evaluates

    @property
    def script(self) -> str:
        return SCRIPTS[self.kind]

    def command(self, python: str) -> List[str]:
        return [python, self.script, *self.argv]


@dataclass(frozen=True)
class Cell:
    """One entry of the tables: a method at one (granularity, k) for one dataset, arch, objective and seed."""
    dataset: str
    arch: str
    objective: str
    seed: Optional[int]
    method: str                    # the table's row label (recipe `method`)
    mode: str                      # the exp-mode whose model is the result
    granularity: Optional[str]
    k: Optional[float]
    stages: Tuple[str, ...]        # its train stages, first to last, then its test

    @property
    def test(self) -> str:
        return self.stages[-1]


@dataclass
class Graph:
    plan: Plan
    stages: Dict[str, Stage] = field(default_factory=dict)   # in dependency order: every stage after its deps
    cells: List[Cell] = field(default_factory=list)

    def dependents(self, key: str) -> List[str]:
        return [s.key for s in self.stages.values() if key in s.deps]


@dataclass(frozen=True)
class GridPoint:
    """A (dataset, arch, objective, seed) of the grid and the options every one of its stages gets."""
    dataset: str
    arch: str
    objective: Optional[str]
    seed: Optional[int]
    result_dir: str
    base: Tuple[str, ...]

    def label(self, mode: str) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{mode} {self.dataset} {self.arch}{' ' + self.objective if self.objective else ''}{seed}"


def expand(plan: Plan, choices: Mapping[str, Sequence[str]]) -> Graph:
    """Every cell of the plan and the stages it needs (each once), in an order where every stage follows its
    dependencies. `choices`: the registry-backed option choices (stage.option_choices())."""
    graph = Graph(plan)
    for dataset in plan.datasets:
        for arch in plan.archs:
            arch = arch or _preset_arch(dataset, choices, plan)
            for objective in plan.objectives:
                for seed in plan.seeds:
                    base = ["--dataset", dataset, "--arch", arch] + _objective_flags(objective, choices, plan)
                    base += ["--seed", str(seed)] if seed is not None else []
                    result_dir = plan.result_dir if seed is None else os.path.join(plan.result_dir, f"seed{seed}")
                    point = GridPoint(dataset, arch, objective, seed, result_dir, tuple(base))
                    for mode in plan.methods:
                        settings = plan.granularities if _masked_chain(mode) else ((None, (None,)),)
                        for granularity, ks in settings:
                            for k in ks:
                                _add_cell(graph, choices, point, mode, granularity, k)
    return graph


def _preset_arch(dataset: str, choices, plan: Plan) -> str:
    """The architecture the dataset preset names (a plan without `archs`)."""
    try:
        cfg, _ = resolve_config(["--dataset", dataset], TRAIN, SCRIPTS[TRAIN], choices=choices)
    except UserError as err:
        raise UserError(f"plan {plan.path}: {err}") from None
    return cfg.arch


def _add_cell(graph: Graph, choices, point: GridPoint, mode: str, granularity: Optional[str],
              k: Optional[float]) -> None:
    keys, previous = [], None
    for step in stage_chain(mode):
        previous = _stage(graph, choices, TRAIN, step, point, granularity, k, previous)
        keys.append(previous.key)
    test = _stage(graph, choices, TEST, mode, point, granularity, k, previous)
    masked = RECIPES[mode].masked
    cell = Cell(point.dataset, point.arch, objective_component(test.cfg), point.seed, RECIPES[mode].method, mode,
                granularity if masked else None, k if masked else None, tuple(keys) + (test.key,))
    if all(c.test != cell.test for c in graph.cells):
        graph.cells.append(cell)


def _objective_flags(objective: Optional[str], choices, plan: Plan) -> List[str]:
    if objective is None:
        return []
    for option, flag in (("adv_loss", "--adv-loss"), ("trainer", "--trainer")):
        if objective in choices.get(option, ()):
            return [flag, objective]
    raise UserError(f"unknown objective {objective!r} in plan {plan.path}; use an --adv-loss "
                    f"({', '.join(choices.get('adv_loss', ()))}) or a --trainer ({', '.join(choices.get('trainer', ()))})")


def _stage(graph: Graph, choices, kind: str, mode: str, point: GridPoint, granularity: Optional[str],
           k: Optional[float], previous: Optional[Stage]) -> Stage:
    """The stage `kind` of `mode` for this cell: added to the graph, or the equal one already there."""
    plan = graph.plan
    masked = RECIPES[mode].masked
    info = NodeInfo(kind, RECIPES[mode].stage, mode, granularity if masked else None, point.dataset, point.arch,
                    point.objective)
    argv = list(point.base) + ["--exp-mode", mode]
    argv += ["--k", f"{k:g}", "--prune-reg", granularity] if masked else []
    argv += _flag_tokens(plan, info)
    argv += ["--result-dir", point.result_dir] + (["--skip-finished"] if kind == TRAIN else [])
    label = point.label(mode) + (f" {granularity} k={k:g}" if masked else "")
    try:
        cfg, _ = resolve_config(argv, kind, SCRIPTS[kind], choices=choices)
    except UserError as err:
        raise UserError(f"plan {plan.path}: {kind} stage {label}: {err}") from None
    directory = run_dir(cfg)
    if kind == TRAIN:
        if previous is not None:
            _check_source(plan, cfg, previous, label)
        stage = Stage(f"{TRAIN}/{os.path.relpath(directory, plan.result_dir)}", kind, mode, RECIPES[mode].stage,
                      label, tuple(argv), cfg, directory, (previous.key,) if previous else ())
    else:
        if os.path.normpath(directory) != os.path.normpath(previous.run_dir):
            raise UserError(f"plan {plan.path}: the test of {label} would read {directory}, but its run is "
                            f"{previous.run_dir}; set options that name a run (stg_id) for train and test alike")
        try:  # what test.py parses first, so that a typo shows now, not after every training stage
            preset_attacks(cfg.attacks, cfg.attack_preset)
            parse_epsilons(cfg.epsilons)
        except UserError as err:
            raise UserError(f"plan {plan.path}, flags for test: {err}") from None
        checkpoint = checkpoint_path(directory, cfg.checkpoint)
        result = result_path(checkpoint, cfg.attack_preset)
        result = result if os.path.isabs(directory) else os.path.relpath(result)  # as the run directory is given
        stage = Stage(f"{TEST}/{os.path.relpath(result, plan.result_dir)}", kind, mode, TEST, f"test {label}",
                      tuple(argv), cfg, directory, (previous.key,), result, checkpoint)
    known = graph.stages.get(stage.key)
    if known is not None and known.argv != stage.argv:
        differ = sorted(set(known.argv) ^ set(stage.argv))
        raise UserError(f"plan {plan.path}: {label} is needed with different options ({' '.join(differ)}); "
                        "options of a shared stage must not depend on the cell")
    return graph.stages.setdefault(stage.key, stage)


def _check_source(plan: Plan, cfg: Config, previous: Stage, label: str) -> None:
    """The stage must read the run the previous stage writes (train.py finds it by the same rule)."""
    source = os.path.dirname(os.path.dirname(source_checkpoint(cfg)))
    if os.path.normpath(source) != os.path.normpath(previous.run_dir):
        raise UserError(f"plan {plan.path}: {label} would start from {source}, but the plan trains "
                        f"{previous.run_dir}; set options that name a run (stg_id) for all of a cell's stages alike")


def _flag_tokens(plan: Plan, node: NodeInfo) -> List[str]:
    """The options of every matching section, the more specific (then the later) winning, as CLI tokens."""
    matching = sorted(((s.weight, i), s) for i, s in enumerate(plan.sections) if s.matches(node))
    merged: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for _, section in matching:
        for name, value in section.options:
            merged[name] = value
            origin[name] = section.key
    tokens: List[str] = []
    for name, value in merged.items():
        scope = OPTION_BY_NAME[name].scope
        if scope not in ("both", node.kind):
            raise UserError(f"option {name} (flags.{origin[name]} of plan {plan.path}) is a "
                            f"{SCRIPTS[scope]} option, not one of {SCRIPTS[node.kind]}; put it under a "
                            f"{'`train`' if scope == TRAIN else '`test`'} selector")
        tokens += option_tokens(name, value)
    return tokens


def _as_cli_value(name: str, value: Any) -> Any:
    """A plan option's value as the command line gives it (a list of names joined by commas), for type checks."""
    if isinstance(value, (list, tuple)) and OPTION_BY_NAME[name].kind != FLOATS:
        return ",".join(str(v) for v in value)
    return value


def option_tokens(name: str, value: Any) -> List[str]:
    """A plan option as command-line tokens: True -> --x, False -> --no-x, a list of numbers -> --x a b c, another
    list -> --x a,b,c (e.g. attacks), None -> nothing."""
    option = OPTION_BY_NAME[name]
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if option.kind in (FLAG, TRISTATE) and isinstance(value, bool):
        if value:
            return [flag]
        return [] if name.startswith("no_") else ["--no-" + name.replace("_", "-")]
    if isinstance(value, (list, tuple)):
        if option.kind == FLOATS:
            return [flag] + [str(v) for v in value]
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]
