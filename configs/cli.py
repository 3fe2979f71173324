"""Command line + YAML presets -> one resolved, validated `Config`.

Precedence, lowest first (README "Configuration"):
  1. built-in defaults (configs/schema.py),
  2. the dataset preset configs/config-<dataset>.yml: its top level, then its `per_mode` section for the
     run's stage (`prune`/`finetune`/`pretrain`) and exact mode, then its `per_loss` section for --adv_loss,
  3. the user's --configs FILE, in the same order,
  4. flags given on the command line.
Nothing later in the code overrides a value set here; options left unset that depend on the mode
(the tri-state ones) are filled from the mode's recipe (configs/recipes.py).

Options backed by a registry of a higher layer (attacks, training objectives: schema.REGISTRY_CHOICES) get their
choices from the entry point (`choices=`), so a new attack or objective needs no edit here.
"""
import argparse
import difflib
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from configs.errors import UserError
from configs.recipes import (RATES_STRATEGY, RECIPES, SCORES_MAGNITUDE, STAGES, Recipe, canonical_mode,
                             mode_names)
from configs.schema import (DATASETS, FLAG, FLOATS, OPTION_BY_NAME, OPTIONS, TRISTATE, Config, coerce_value,
                            match_choice)

PRESET_DIR = os.path.dirname(os.path.abspath(__file__))
SECTION_KEYS = ("per_mode", "per_loss")
Choices = Optional[Mapping[str, Sequence[str]]]

_GROUP_TITLES = {
    "experiment": "experiment and stage chaining",
    "pruning": "pruning (score/rate learning, hardware loss)",
    "data": "data",
    "training": "training",
    "attack": "threat model (training, validation, and test.py's default)",
    "runtime": "runtime",
    "evaluation": "evaluation",
}


class _Parser(argparse.ArgumentParser):
    """One-line errors, no prefix abbreviations (`--epoch 5` is not `--epochs 5`), "did you mean" for typos."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, no usage dump: the caller prints it and exits non-zero
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [a.split("=")[0] for a in unknown.group(1).split() if a.startswith("--")]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            hints = [f"{flag} -> {close[0]}" for flag in flags for close in [difflib.get_close_matches(flag, known, 1)]
                     if close]
            if hints:
                message += f" (did you mean: {'; '.join(hints)}?)"
        raise UserError(message)


def with_modes(choices: Choices) -> Dict[str, Sequence[str]]:
    """The registry-backed choices plus the registered exp-modes."""
    return {**(choices or {}), "exp_mode": mode_names()}


def preset_path(dataset: str) -> str:
    return os.path.join(PRESET_DIR, f"config-{dataset.lower()}.yml")


def build_parser(prog: str, scope: str, description: str = "", choices: Choices = None,
                 resolved: Optional[Dict[str, str]] = None, add_help: bool = True) -> argparse.ArgumentParser:
    """Flags for every option in `scope` ('train' or 'test'); only flags actually given are returned.
    `choices`: names of the registry-backed options, shown in their help; `resolved`: what the preset and config
    layers set for this dataset and mode, shown next to the built-in default."""
    choices = with_modes(choices)
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS, add_help=add_help)
    groups = {}
    for opt in OPTIONS:
        if opt.scope not in ("both", scope):
            continue
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(_GROUP_TITLES[opt.group])
        group = groups[opt.group]
        primary = "--" + opt.name.replace("_", "-")
        alias = "--" + opt.name if "_" in opt.name else None
        help_text = opt.help.replace("%", "%%")  # argparse formats help strings with %
        listed = opt.choices or (choices or {}).get(opt.name)
        if listed:
            help_text += f" {{{', '.join(listed)}}}"
        if opt.default is not None and opt.kind not in (FLAG, TRISTATE):
            help_text += f" (default: {opt.default})"
        if resolved and opt.name in resolved:
            help_text += f" [here: {resolved[opt.name]}]".replace("%", "%%")
        if opt.kind in (FLAG, TRISTATE):
            if opt.name.startswith("no_"):
                group.add_argument(primary, dest=opt.name, action="store_true", help=help_text)
            else:
                group.add_argument(primary, dest=opt.name, action=argparse.BooleanOptionalAction, help=help_text)
            if alias:
                group.add_argument(alias, dest=opt.name, action="store_true", help=argparse.SUPPRESS)
        elif opt.kind == FLOATS:
            group.add_argument(primary, dest=opt.name, nargs="+", type=str, metavar="X", help=help_text)
            if alias:
                group.add_argument(alias, dest=opt.name, nargs="+", type=str, help=argparse.SUPPRESS)
        else:
            metavar = opt.name.upper()
            group.add_argument(primary, dest=opt.name, type=str, metavar=metavar, help=help_text)
            if alias:
                group.add_argument(alias, dest=opt.name, type=str, help=argparse.SUPPRESS)
    return parser


def load_yaml_config(path: str, what: str, choices: Choices = None) -> Dict[str, Any]:
    """Read a config file with safe_load; unknown keys and sections are errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of option: value")
    for key, value in data.items():
        if key in SECTION_KEYS:
            _check_section(path, key, value, choices)
        elif key not in OPTION_BY_NAME:
            raise UserError(f"unknown key {key!r} in {path}")
    return data


def _check_section(path: str, section: str, value: Any, choices: Choices) -> None:
    if not isinstance(value, dict):
        raise UserError(f"section {section!r} in {path} must be a mapping")
    allowed = STAGES + tuple(RECIPES) if section == "per_mode" else (choices or {}).get("adv_loss")
    for sub, entries in value.items():
        if allowed is not None and sub not in allowed:
            raise UserError(f"unknown {section} entry {sub!r} in {path}; allowed: {', '.join(allowed)}")
        if not isinstance(entries, dict):
            raise UserError(f"{section}.{sub} in {path} must be a mapping of option: value")
        for key in entries:
            if key not in OPTION_BY_NAME:
                raise UserError(f"unknown key {key!r} in {section}.{sub} of {path}")


def _layers(data: Dict[str, Any], mode: str, adv_loss: str, name: str) -> List[Tuple[str, Dict[str, Any]]]:
    """A config file's top level, then its stage section, exact-mode section and loss section."""
    base = {k: v for k, v in data.items() if k not in SECTION_KEYS}
    per_mode = data.get("per_mode", {})
    per_loss = data.get("per_loss", {})
    stage = RECIPES[mode].stage
    return [
        (name, base),
        (f"{name} per_mode.{stage}", per_mode.get(stage, {})),
        (f"{name} per_mode.{mode}", per_mode.get(mode, {})),
        (f"{name} per_loss.{adv_loss}", per_loss.get(adv_loss, {})),
    ]


def resolve_config(argv: Sequence[str], scope: str, prog: str, choices: Choices = None) -> Tuple[Config, Dict[str, str]]:
    """Parse `argv` and merge it with the presets; returns the Config and where each value came from.
    With -h/--help, the help shows what the chosen dataset preset and mode set, then the process exits."""
    choices = with_modes(choices)
    if "-h" in argv or "--help" in argv:
        build_parser(prog, scope, choices=choices, resolved=_preset_values(argv, scope, prog, choices)).parse_args(
            list(argv))
    cli = {k: v for k, v in vars(build_parser(prog, scope, choices=choices).parse_args(list(argv))).items()}
    values, sources = _merge({k: coerce_value(k, v, "the command line", choices) for k, v in cli.items()}, choices)
    _check_consistency(values, sources, scope)
    return Config(**values), sources


def _preset_values(argv: Sequence[str], scope: str, prog: str, choices: Choices) -> Dict[str, str]:
    """For --help: 'value from source' of every option a preset or config layer sets for the given dataset/mode."""
    try:
        known, _ = build_parser(prog, scope, choices=choices, add_help=False).parse_known_args(
            [a for a in argv if a not in ("-h", "--help")])
        values, sources = _merge({k: coerce_value(k, v, "the command line", choices) for k, v in vars(known).items()},
                                 choices)
    except UserError:
        return {}
    return {k: f"{values[k]} from {src}" for k, src in sources.items() if src not in ("default", "command line")}


def _merge(cli: Dict[str, Any], choices: Choices) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Defaults < preset (top, stage, mode, loss sections) < --configs file (same order) < command line."""
    user = load_yaml_config(cli["configs"], "config file", choices) if cli.get("configs") else {}

    def first_set(name: str, *layers: Dict[str, Any]):
        for layer in layers:
            if layer.get(name) is not None:
                return layer[name]
        return OPTION_BY_NAME[name].default

    dataset = match_choice("dataset", str(first_set("dataset", cli, user)), DATASETS, "the dataset choice")
    preset = load_yaml_config(preset_path(dataset), "dataset preset", choices)
    mode = canonical_mode(str(first_set("exp_mode", cli, user, preset)))
    for option, value, other_mode in RECIPES[mode].becomes:
        if coerce_value(option, first_set(option, cli, user), "the mode choice") == value:
            mode = other_mode
    adv_loss = coerce_value("adv_loss", first_set("adv_loss", cli, user, preset), "the loss choice", choices)

    values = {o.name: o.default for o in OPTIONS}
    sources = {o.name: "default" for o in OPTIONS}
    layers = _layers(preset, mode, adv_loss, os.path.relpath(preset_path(dataset)))
    if user:
        layers += _layers(user, mode, adv_loss, cli["configs"])
    layers.append(("command line", cli))
    for source, entries in layers:
        for key, value in entries.items():
            values[key] = coerce_value(key, value, source, choices)
            sources[key] = source
    values["dataset"], values["exp_mode"], values["adv_loss"] = dataset, mode, adv_loss
    _fill_mode_defaults(values, sources)
    return values, sources


def recipe_defaults(spec: Recipe) -> Dict[str, bool]:
    """The tri-state options a recipe decides unless the user does."""
    return {"soft_hw": "hardware" in spec.regularizers,
            "scaled_score_init": spec.score_init == SCORES_MAGNITUDE,
            "rate_stg_init": spec.rate_init == RATES_STRATEGY}


def _fill_mode_defaults(values: Dict[str, Any], sources: Dict[str, str]) -> None:
    spec = RECIPES[values["exp_mode"]]
    for key, value in recipe_defaults(spec).items():
        if values[key] is None:
            values[key] = value
            sources[key] = f"mode {spec.name}"
    if values["trainer"] == "base" and values["adv_loss"] != "nat":
        if sources["adv_loss"] != "default":
            raise UserError("--trainer base trains on clean inputs; drop --adv_loss "
                            f"{values['adv_loss']} or use --trainer adv")
        values["adv_loss"], sources["adv_loss"] = "nat", "trainer base"


def _check_consistency(values: Dict[str, Any], sources: Dict[str, str], scope: str) -> None:
    for name in ("conv_k", "shortcut_k", "fc_k"):
        if values[name] is not None:
            raise UserError(f"--{name} is not supported: per-layer start rates come from --stg_id "
                            "(strategies/ or a computed <density>_<uni|erk|lamp>)")
    if values["layer_type"] == "dense" and RECIPES[values["exp_mode"]].masked:
        raise UserError(f"--layer-type dense cannot run {values['exp_mode']}: it needs masked layers")
    if values["clip_min"] >= values["clip_max"]:
        raise UserError(f"clip_min ({values['clip_min']}) must be below clip_max ({values['clip_max']})")
    if values["trainer"] == "freeadv" and values["adv_loss"] not in ("pgd", "nat") and sources["adv_loss"] != "default":
        raise UserError(f"--trainer freeadv uses its own Free-AT objective; --adv_loss {values['adv_loss']} does not apply")
    if RECIPES[values["exp_mode"]].masked and values["k"] is None and not (scope == "test" and values["source_net"]):
        raise UserError(f"--k is required in {values['exp_mode']}: the fraction of weights to keep (e.g. --k 0.01 "
                        "keeps 1 %); no preset sets it")
    if values["arch"] is None:
        raise UserError(f"no --arch given and {os.path.relpath(preset_path(values['dataset']))} sets none")
    if values["std"] is not None and any(v <= 0 for v in values["std"]):
        raise UserError("every --std value must be > 0")


def describe_overrides(sources: Dict[str, str], cfg: Config) -> List[str]:
    """Human-readable 'name = value  (source)' lines for every value that is not a built-in default."""
    return [f"{name} = {getattr(cfg, name)!r}  ({src})" for name, src in sources.items() if src != "default"]
