"""scripts/reproduce.py: plans expanded into the stage graph, local runs (with a stub interpreter standing in for
train.py/test.py), stage states, SLURM submission against a fake sbatch, tables of the finished cells and the compute
estimate. The real digits plan is measured in docs/reproduction.md, not run here."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from configs.errors import UserError
from configs.schema import config_to_dict
from scripts import reproduce
from scripts.reproduction import estimate, local, slurm, state
from scripts.reproduction.plan import expand, load_plan, method_modes
from stage import option_choices
from tests.conftest import ROOT
from tests.test_tables import result as fake_result
from utils.checkpoint import save_atomic
from utils.run_dir import checkpoint_path

PLANS = os.path.join(ROOT, "scripts", "plans")


def graph_of(path, result_dir=None):
    return expand(load_plan(path, result_dir), option_choices())


def write_plan(tmp_path, **fields):
    plan = {"name": "t", "result_dir": str(tmp_path / "results"), "datasets": ["digits"], "archs": ["small_cnn"],
            "methods": ["dense", "LWM", "HARP"], "granularities": {"weight": [0.1]},
            "flags": {"test": {"attacks": "natural"}}}
    plan.update(fields)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def option(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


# ----------------------------------------------------------------------------------------------- expansion
def test_harp_cifar10_dry_run_lists_each_stage_once_with_its_flags_and_dependencies(capsys):
    path = os.path.join(PLANS, "harp-cifar10.yaml")
    with open(path) as fh:
        spec = yaml.safe_load(fh)
    assert reproduce.main([path, "--dry-run", "--json", "--python", "python"]) == 0
    stages = json.loads(capsys.readouterr().out)
    by_id = {s["id"]: s for s in stages}
    commands = [" ".join(s["command"]) for s in stages]
    assert len(set(commands)) == len(commands) and len({s["key"] for s in stages}) == len(stages)

    archs, settings = spec["archs"], sum(len(ks) for ks in spec["granularities"].values())
    train_modes_per_setting = {"lwm_finetune", "score_prune", "score_finetune", "rate_prune", "rate_finetune",
                               "harp_prune", "harp_finetune"}
    trains = [s for s in stages if s["kind"] == "train"]
    tests = [s for s in stages if s["kind"] == "test"]
    assert len(trains) == len(archs) * (1 + settings * len(train_modes_per_setting))  # one pretrain per arch
    assert len(tests) == len(archs) * (1 + settings * 4)                                # dense + 4 pruned methods
    for s in stages:
        argv = s["command"][2:]
        assert s["command"][:2] == ["python", "train.py" if s["kind"] == "train" else "test.py"]
        assert option(argv, "--dataset") == "CIFAR10" and option(argv, "--adv-loss") == "pgd"
        assert all(by_id[d]["id"] < s["id"] for d in s["after"])  # dependencies come first
        if s["kind"] == "test":
            assert option(argv, "--attacks") == spec["flags"]["test"]["attacks"]
            assert "--epochs" not in argv and "--skip-finished" not in argv
            (dep,) = s["after"]
            trained = by_id[dep]
            assert trained["kind"] == "train" and trained["mode"] == s["mode"]
            assert s["result"] == os.path.join(trained["run_dir"], "eval", "model_best_standard.json")
            continue
        assert "--skip-finished" in argv and option(argv, "--result-dir") == "trained_models"
        expected_epochs = spec["flags"][s["stage"]]["epochs"]
        assert option(argv, "--epochs") == str(expected_epochs)
        if s["mode"] == "pretrain":
            assert s["after"] == [] and "--k" not in argv and "--stg-id" not in argv
            continue
        granularity = option(argv, "--prune-reg")
        assert float(option(argv, "--k")) in spec["granularities"][granularity]
        assert option(argv, "--stg-id") == spec["flags"][granularity]["stg_id"]
        assert option(argv, "--gamma") == ("0.01" if s["stage"] == "prune" else None)
        (dep,) = s["after"]
        source = by_id[dep]
        wanted = {"lwm_finetune": "pretrain", "score_prune": "pretrain", "rate_prune": "pretrain",
                  "harp_prune": "pretrain", "score_finetune": "score_prune", "rate_finetune": "rate_prune",
                  "harp_finetune": "harp_prune"}[s["mode"]]
        assert source["mode"] == wanted and option(source["command"][2:], "--arch") == option(argv, "--arch")
        if wanted != "pretrain":  # the same cell's prune stage: same k, granularity and start strategy
            source_argv = source["command"][2:]
            for flag in ("--k", "--prune-reg", "--stg-id"):
                assert option(source_argv, flag) == option(argv, flag)


def test_text_dry_run_names_every_stage_and_what_it_waits_for(capsys):
    assert reproduce.main([os.path.join(PLANS, "digits.yaml"), "--dry-run", "--python", "python"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plan digits: 13 cells, 34 stages (21 train, 13 test)")
    assert out[1] == "[1] pretrain digits small_cnn pgd" and out[3] == "    after: -"
    assert out[2].startswith("    python train.py --dataset digits --arch small_cnn --adv-loss pgd --exp-mode pretrain")
    assert "    after: [1]" in out


@pytest.mark.parametrize("plan", sorted(os.listdir(PLANS)))
def test_every_shipped_plan_expands(plan):
    graph = graph_of(os.path.join(PLANS, plan))
    assert graph.cells and all(cell.test in graph.stages for cell in graph.cells)
    for stage in graph.stages.values():
        assert all(dep in graph.stages for dep in stage.deps)


def test_ap_benchmark_plan_is_the_benchmarks_protocol():
    graph = graph_of(os.path.join(PLANS, "ap-benchmark.yaml"))
    pruned = [c for c in graph.cells if c.granularity]
    assert {(c.granularity, c.k) for c in pruned} == {("weight", 0.1), ("weight", 0.05), ("weight", 0.01),
                                                      ("channel", 0.5), ("channel", 0.25), ("channel", 0.1)}
    assert {c.dataset for c in graph.cells} == {"CIFAR10", "SVHN"} and {c.arch for c in graph.cells} == {"resnet18",
                                                                                                     "vgg16_bn"}
    tests = [s for s in graph.stages.values() if s.kind == "test"]
    assert all(s.cfg.attack_preset == "ap" and s.result.endswith("model_best_ap.json") for s in tests)


def test_hydra_mnist_plan_tests_each_objective_with_its_own_measure():
    graph = graph_of(os.path.join(PLANS, "hydra-mnist.yaml"))
    assert {(c.objective, c.mode, c.k) for c in graph.cells} == {
        (o, m, k) for o in ("pgd", "smooth", "mixtrain", "crown-ibp")
        for m, k in (("pretrain", None), ("score_finetune", 0.1), ("score_finetune", 0.01))}
    measures = {"pgd": ("natural,pgd50,autoattack", 1000), "smooth": ("natural,certify", 500),
                "mixtrain": ("natural,ibp,sym,crown-ibp", 1000), "crown-ibp": ("natural,ibp,sym,crown-ibp", 1000)}
    for cell in graph.cells:
        test = graph.stages[cell.test].cfg
        assert (test.attacks, test.n_examples) == measures[cell.objective]
        assert test.dataset == "MNIST" and test.arch == "cifar_model"
        if cell.objective == "smooth":
            assert (test.noise_std, test.certify_n, test.certify_radii) == (0.25, 10000, [0.25, 0.5, 0.75])
        else:
            assert test.epsilon == 0.1
    trains = [s.cfg for s in graph.stages.values() if s.kind == "train"]
    assert len(trains) == 20 and {cfg.trainer for cfg in trains} == {"adv", "smooth", "mixtrain", "crown-ibp"}


def test_seeds_get_their_own_subtrees_and_pretrains(tmp_path):
    graph = graph_of(write_plan(tmp_path, seeds=[1, 2], methods=["HARP"]))
    pretrains = [s for s in graph.stages.values() if s.mode == "pretrain"]
    assert sorted(s.cfg.seed for s in pretrains) == [1, 2]
    assert sorted(os.path.relpath(s.run_dir, str(tmp_path / "results")).split(os.sep)[0] for s in pretrains) == \
        ["seed1", "seed2"]
    assert sorted(c.seed for c in graph.cells) == [1, 2]
    for stage in graph.stages.values():
        assert stage.cfg.seed == int(option(list(stage.argv), "--seed"))


def test_more_specific_flags_win(tmp_path):
    flags = {"all": {"no_progress": True}, "train": {"epochs": 3}, "prune": {"epochs": 4}, "harp_prune": {"epochs": 5},
             "train+weight": {"gamma": 0.2}, "test": {"attacks": "natural"}, "test+harp_finetune": {"n_examples": 7},
             "channel": {"stg_id": "original"}}
    graph = graph_of(write_plan(tmp_path, methods=["dense", "Hydra", "HARP"], flags=flags,
                                granularities={"weight": [0.1], "channel": [0.5]}))
    stages = {(s.kind, s.mode, s.cfg.prune_reg if s.mode != "pretrain" else None): s.cfg
              for s in graph.stages.values()}
    assert stages[("train", "pretrain", None)].epochs == 3
    assert stages[("train", "score_prune", "weight")].epochs == 4
    assert stages[("train", "harp_prune", "weight")].epochs == 5 and stages[("train", "harp_prune", "weight")].gamma == 0.2
    assert stages[("train", "harp_prune", "channel")].gamma != 0.2 and stages[("train", "harp_prune", "channel")].stg_id == "original"
    assert stages[("test", "harp_finetune", "weight")].n_examples == 7
    assert stages[("test", "score_finetune", "weight")].n_examples is None
    assert stages[("train", "pretrain", None)].stg_id == "010_uni"  # granularity sections skip unmasked stages


def test_objective_sections_set_the_options_of_that_objectives_cells(tmp_path):
    flags = {"test": {"attacks": "natural"}, "mixtrain+test": {"attacks": "natural,sym"},
             "smooth": {"noise_std": 0.5}, "mixtrain+prune": {"epochs": 2}}
    graph = graph_of(write_plan(tmp_path, archs=["cifar_model"], objectives=["pgd", "smooth", "mixtrain"],
                                methods=["dense", "Hydra"], flags=flags))
    assert {c.objective for c in graph.cells} == {"pgd", "smooth", "mixtrain"}
    for stage in graph.stages.values():
        objective = stage.cfg.trainer if stage.cfg.trainer in ("smooth", "mixtrain") else stage.cfg.adv_loss
        if stage.kind == "test":
            assert stage.cfg.attacks == ("natural,sym" if objective == "mixtrain" else "natural")
        assert (stage.cfg.noise_std == 0.5) == (objective == "smooth")
        if stage.kind == "train" and stage.stage == "prune":
            assert (stage.cfg.epochs == 2) == (objective == "mixtrain")


@pytest.mark.parametrize("fields,message", [
    ({"flags": {"tset": {"attacks": "natural"}}}, "unknown selector 'tset'"),
    ({"flags": {"all": {"epoch": 3}}}, "unknown option 'epoch'"),
    ({"flags": {"all": {"k": 0.5}}}, "is not allowed"),
    ({"flags": {"all": {"lr": 0.5}}}, "put it under a `train` selector"),
    ({"methods": ["HARPP"]}, "unknown method 'HARPP'"),
    ({"granularities": {"filter": [0.5]}}, "unknown granularity"),
    ({"granularities": {}}, "no `granularities`"),
    ({"objectives": ["pgdd"]}, "unknown objective"),
    ({"flags": {"prune": {"stg_id": "001_uni"}}}, "would start from"),
    ({"colect": {}}, "unknown key 'colect'"),
])
def test_plan_mistakes_are_one_line_errors(tmp_path, fields, message):
    with pytest.raises(UserError, match=message):
        graph_of(write_plan(tmp_path, **fields))


def test_methods_by_label_or_mode():
    assert method_modes("Hydra") == method_modes("hydra (score)") == ["score_finetune"]
    assert method_modes("dense") == ["pretrain"] and method_modes("harp-prune") == ["harp_prune"]
    assert method_modes("LWM") == ["lwm_finetune"] and method_modes("rate") == ["rate_finetune"]


# ----------------------------------------------------------------------------------------------- running
STUB = """\
#!{python}
# Stands in for `python train.py|test.py ARGS`: logs the call, fails or sleeps when told, else marks it done.
import hashlib, os, sys, time
out = os.environ["STUB_DIR"]
args = sys.argv[1:]
with open(os.path.join(out, "calls.log"), "a") as fh:
    fh.write(" ".join(args) + "\\n")
mode = args[args.index("--exp-mode") + 1]
if mode in os.environ.get("STUB_FAIL", "").split(","):
    print(f"{{args[0]}}: error: {{mode}} broke", file=sys.stderr)
    sys.exit(2)
if mode in os.environ.get("STUB_WARN", "").split(","):
    print(f"warning: the best natural accuracy of {{mode}} is at chance level", file=sys.stderr)
if mode in os.environ.get("STUB_SLEEP", "").split(","):
    with open(os.path.join(out, "sleeper.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(60)
open(os.path.join(out, hashlib.sha1(" ".join(args).encode()).hexdigest()), "w").close()
print("stub done")
"""


@pytest.fixture
def stub(tmp_path, monkeypatch):
    folder = tmp_path / "stub"
    folder.mkdir()
    path = folder / "python"
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("STUB_DIR", str(folder))
    return path


def stub_done(folder):
    def done(stage):
        return (folder / hashlib.sha1(" ".join([stage.script, *stage.argv]).encode()).hexdigest()).exists()
    return done


def calls(folder):
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_local_run_continues_past_a_failed_branch_and_a_rerun_finishes_only_what_is_missing(tmp_path, stub,
                                                                                             monkeypatch):
    graph = graph_of(write_plan(tmp_path, methods=["dense", "LWM", "HARP"]))
    markers = state.Markers(state.state_root(graph.plan.result_dir))
    done, lines = stub_done(stub.parent), []
    monkeypatch.setenv("STUB_FAIL", "harp_prune")
    outcome = local.run_graph(graph, str(stub), markers, say=lines.append, done=done)
    by_mode = {s.mode + ("/test" if s.kind == "test" else ""): s.key for s in graph.stages.values()}
    assert list(outcome.failed) == [by_mode["harp_prune"]] and not outcome.ok
    assert set(outcome.blocked) == {by_mode["harp_finetune"], by_mode["harp_finetune/test"]}
    assert len(outcome.succeeded) == 4  # pretrain, lwm_finetune and their tests
    failure = markers.failed(by_mode["harp_prune"])
    assert failure["returncode"] == 2 and "harp_prune broke" in failure["tail"][-1]
    assert "harp_prune broke" in open(markers.log_path(by_mode["harp_prune"])).read()
    assert markers.running(by_mode["harp_prune"]) is None
    first = calls(stub.parent)
    assert len(first) == 5

    monkeypatch.delenv("STUB_FAIL")
    outcome = local.run_graph(graph, str(stub), markers, say=lines.append, done=done)
    assert outcome.ok and len(outcome.skipped) == 4 and len(outcome.succeeded) == 3
    rerun = calls(stub.parent)[len(first):]
    assert [option(c.split(), "--exp-mode") for c in rerun] == ["harp_prune", "harp_finetune", "harp_finetune"]
    assert markers.failed(by_mode["harp_prune"]) is None


def test_a_finished_stage_that_warned_is_reported_with_its_warning(tmp_path, stub, monkeypatch):
    graph = graph_of(write_plan(tmp_path, methods=["dense", "HARP"]))
    markers = state.Markers(state.state_root(graph.plan.result_dir))
    monkeypatch.setenv("STUB_WARN", "harp_prune")
    lines = []
    outcome = local.run_graph(graph, str(stub), markers, say=lines.append, done=stub_done(stub.parent))
    assert outcome.ok
    warned = [line for line in lines if "warning:" in line]
    assert len(warned) == 1 and warned[0].endswith("small_cnn weight k=0.1: warning: the best natural accuracy of "
                                                   "harp_prune is at chance level")


def test_console_warnings_start_with_the_prefix_the_runner_looks_for(capsys):
    import logging
    from utils.logging import WARNING_PREFIX, setup_logging
    setup_logging()
    logging.getLogger("t").info("plain")
    logging.getLogger("t").warning("off target")
    assert capsys.readouterr().err.splitlines()[-2:] == ["plain", WARNING_PREFIX + "off target"]


def test_console_logging_writes_to_the_stderr_of_the_moment(monkeypatch):
    import io
    import logging
    from utils.logging import setup_logging
    at_setup, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", at_setup)
    setup_logging()
    at_setup.close()                          # e.g. a finished test's captured output
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("t").warning("still seen")
    assert later.getvalue() == "warning: still seen\n"


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as from a terminal, even when the suite runs in the background (`cmd &` starts it with SIGINT
    ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_stage_and_leaves_it_unfinished_not_failed(tmp_path, stub, monkeypatch, ctrl_c_raises):
    graph = graph_of(write_plan(tmp_path, methods=["dense"]))
    markers = state.Markers(state.state_root(graph.plan.result_dir))
    monkeypatch.setenv("STUB_SLEEP", "pretrain")
    pretrain = next(iter(graph.stages.values()))
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.time()
    with pytest.raises(local.Interrupted):
        local.run_graph(graph, str(stub), markers, say=lambda line: None, done=stub_done(stub.parent))
    assert time.time() - started < 15
    pid = int((stub.parent / "sleeper.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stage's process is gone
    assert markers.running(pretrain.key) is None and markers.failed(pretrain.key) is None


def test_a_stage_dies_with_its_killed_runner(tmp_path, stub, monkeypatch):
    """SIGKILL of the runner must not leave the stage writing into the run directory a rerun will resume."""
    monkeypatch.setenv("STUB_SLEEP", "pretrain")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from scripts.reproduction.local import run_command
        from scripts.reproduction.state import Markers
        run_command("train/x", [{str(stub)!r}, "train.py", "--exp-mode", "pretrain"], Markers({str(tmp_path / "m")!r}))
    """)
    runner = subprocess.Popen([sys.executable, "-c", code])
    pid_file = stub.parent / "sleeper.pid"
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    runner.kill()
    runner.wait()
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage outlived its runner")
    markers = state.Markers(str(tmp_path / "m"))
    assert markers.running("train/x") is not None  # left behind by the killed runner ...
    assert markers.running("train/x", now=time.time() + state.STALE_S + 1) is None  # ... and it goes stale


# ----------------------------------------------------------------------------------------------- states
def finish_train(stage, **changes):
    cfg = config_to_dict(stage.cfg)
    cfg.update(changes)
    ckpt = {"epoch": stage.cfg.epochs, "finished": True, "config": cfg}
    save_atomic(ckpt, checkpoint_path(stage.run_dir, "last"))
    save_atomic(ckpt, checkpoint_path(stage.run_dir, "best"))


def finish_test(stage, seed=None):
    cfg = {"seed": stage.cfg.seed if seed is None else seed}
    data = fake_result(stage.cfg.arch, stage.mode, stage.cfg.k or 1.0, 90.0 + (seed or 0), 80.0 - (seed or 0),
                       dataset=stage.cfg.dataset, prune_reg=stage.cfg.prune_reg, attack="natural", n=360)
    data.update(checkpoint=stage.checkpoint, train_config=cfg)
    os.makedirs(os.path.dirname(stage.result), exist_ok=True)
    with open(stage.result, "w") as fh:
        json.dump(data, fh)


def test_status_reports_done_running_failed_and_missing(tmp_path, capsys):
    path = write_plan(tmp_path, methods=["dense", "LWM", "HARP"], granularities={"weight": [0.1, 0.01]})
    graph = graph_of(path)
    stages = list(graph.stages.values())
    markers = state.Markers(state.state_root(graph.plan.result_dir))
    pretrain, pretrain_test = stages[0], stages[1]
    finish_train(pretrain)
    finish_test(pretrain_test)
    lwm = [s for s in stages if s.mode == "lwm_finetune" and s.kind == "train"]
    markers.start(lwm[0].key, ["x"])                  # running
    markers.start(lwm[1].key, ["x"])
    markers.finish(lwm[1].key, 2, ["train.py: error: boom"])  # failed
    harp = [s for s in stages if s.mode == "harp_prune"][0]
    finish_train(harp, epochs=harp.cfg.epochs + 1)    # a finished run with other settings: missing
    assert state.stage_state(harp, markers).state == state.MISSING
    assert "other settings" in state.stage_state(harp, markers).detail

    assert reproduce.main([path, "--status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["k"]): c["state"] for c in report["cells"]}
    assert cells == {("dense", None): "done", ("LWM", 0.1): "running", ("LWM", 0.01): "failed",
                     ("HARP", 0.1): "missing", ("HARP", 0.01): "missing"}
    assert reproduce.main([path, "--status"]) == 0
    text = capsys.readouterr().out
    assert "5 cells: 1 done, 1 running, 1 failed, 2 missing" in text and "boom" in text


def test_collect_writes_tables_and_a_plot_of_the_finished_cells_with_seeds_aggregated(tmp_path):
    path = write_plan(tmp_path, seeds=[1, 2], methods=["dense", "HARP"], collect={"attack": "natural"})
    graph = graph_of(path)
    for stage in graph.stages.values():
        if stage.kind == "train":
            finish_train(stage)
    for cell in graph.cells:
        if cell.method == "dense":  # the HARP cells stay unfinished
            finish_test(graph.stages[cell.test], seed=cell.seed)
    out = tmp_path / "tables"
    assert reproduce.main([path, "--collect", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| dense | – | 91.50 ± 0.71 / 78.50 ± 0.71 (n=2) |" in table and "HARP" not in table
    assert (out / "table.csv").read_text().startswith("dataset,method")
    assert "\\toprule" in (out / "table.tex").read_text()
    assert (out / "accuracy_sparsity.png").stat().st_size > 0


def test_collect_compares_methods_by_the_plans_cells_paired_by_seed(tmp_path):
    path = write_plan(tmp_path, seeds=[1, 2, 3], methods=["dense", "Hydra", "HARP"],
                      granularities={"weight": [0.01], "channel": [0.25]},
                      collect={"attack": "natural", "compare_attacks": ["natural"]})
    graph = graph_of(path)
    for stage in graph.stages.values():
        if stage.kind == "train":
            finish_train(stage)
    gaps = {1: 3.0, 2: 5.0, 3: 1.0}  # HARP - Hydra per seed: mean 3, std 2, HARP wins 3 of 3
    for cell in graph.cells:
        finish_test(graph.stages[cell.test], seed=cell.seed)
        if cell.method == "HARP":
            with open(graph.stages[cell.test].result) as fh:
                data = json.load(fh)
            data["natural_acc"] += gaps[cell.seed]
            data["budget"] = {"measure": "flops" if cell.granularity == "channel" else "keep", "target": 0.0627,
                              "reached": 0.03, "on_target": cell.granularity != "channel"}
            with open(graph.stages[cell.test].result, "w") as fh:
                json.dump(data, fh)
    out = tmp_path / "tables"
    assert reproduce.main([path, "--collect", "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "| weight k 0.01 (99 % pruned) | Hydra (score) | 3 | 92.00 ± 1.00 |" in text
    assert "| weight k 0.01 (99 % pruned) | HARP | 3 | 95.00 ± 1.73 | 99.00 % sparse |" in text
    assert "| channel k 0.25 | HARP | 3 | 95.00 ± 1.73 | 75.00 % sparse, FLOPs 3 % (target 6.27 %), **3 off target** |" in text
    from scipy.stats import ttest_rel
    p = ttest_rel([94.0, 97.0, 94.0], [91.0, 92.0, 93.0]).pvalue
    assert f"| weight k 0.01 (99 % pruned) | Hydra (score) | 3.00 ± 2.00 (3/3, p {p:.2g}) |" in text


def test_collect_measured_shows_each_objectives_own_measures_and_another_attack_gets_its_own_folder(tmp_path):
    path = write_plan(tmp_path, methods=["dense", "HARP"], objectives=["pgd", "smooth"],
                      collect={"attack": "natural", "compare_attacks": "measured"})
    graph = graph_of(path)
    for stage in graph.stages.values():
        if stage.kind == "train":
            finish_train(stage)
    for cell in graph.cells:
        finish_test(graph.stages[cell.test])
        result = graph.stages[cell.test].result
        with open(result) as fh:
            data = json.load(fh)
        if cell.objective == "smooth":   # certified at radius 0 (robust_acc) and on a radius grid
            data["attacks"]["certify"] = {"robust_acc": 70.0, "certified_accuracy": [
                {"radius": 0.25, "acc": 60.0}, {"radius": 0.5, "acc": 40.0}]}
        else:
            data["attacks"]["pgd50"] = {"robust_acc": 75.0 if cell.method == "HARP" else 77.0}
        with open(result, "w") as fh:
            json.dump(data, fh)
    assert reproduce.main([path, "--collect"]) == 0
    folder = os.path.join(graph.plan.result_dir, "tables", "t")
    text = open(os.path.join(folder, "compare.md")).read()
    pgd, smooth = text.split("## digits, small_cnn, smooth")
    assert "natural / pgd50)" in pgd and "certify" not in pgd
    assert "| weight k 0.1 (90 % pruned) | HARP | 1 | 90.00 | 75.00 |" in pgd
    assert "natural / certify / certify r=0.25 / certify r=0.5)" in smooth and "pgd50" not in smooth
    assert "| dense | dense | 1 | 90.00 | 70.00 | 60.00 | 40.00 |" in smooth
    assert reproduce.main([path, "--collect", "--attack", "certify"]) == 0   # another measure: its own subfolder
    assert os.path.exists(os.path.join(folder, "certify", "table.md"))
    assert open(os.path.join(folder, "compare.md")).read() == text       # the plan's own collection stays


def test_collect_without_finished_cells_says_so(tmp_path, capsys):
    assert reproduce.main([write_plan(tmp_path), "--collect"]) == 2
    assert "no cell of plan t is finished yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- SLURM
FAKE_SBATCH = """\
#!{python}
# Records its arguments and prints the next job id, as `sbatch --parsable` does.
import json, os, sys
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbatch.jsonl")
count = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{4100 + count}};cluster")
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (folder / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder / "sbatch.jsonl"


def submitted(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_slurm_submits_one_array_per_stage_each_after_the_previous(tmp_path, fake_sbatch, stub, capsys):
    path = write_plan(tmp_path, methods=["dense", "LWM", "HARP"], granularities={"weight": [0.1, 0.01]},
                      slurm={"gpus": 1, "time": {"pretrain": "10:00:00", "default": "2:00:00"}, "max_parallel": 4})
    assert reproduce.main([path, "--slurm", "--partition", "gpu", "--sbatch-arg=--account=abc",
                           "--python", str(stub)]) == 0
    jobs = submitted(fake_sbatch)
    assert [option_value(j, "--job-name") for j in jobs] == ["harp-t-pretrain", "harp-t-prune", "harp-t-finetune",
                                                             "harp-t-test"]
    # pretrain: 1; prune: harp_prune x2; finetune: lwm x2 + harp x2; test: dense + 4
    assert [option_value(j, "--array") for j in jobs] == ["0-0%4", "0-1%4", "0-3%4", "0-4%4"]
    assert [option_value(j, "--dependency") for j in jobs] == [None, "afterok:4100", "afterok:4101", "afterok:4102"]
    assert all("--kill-on-invalid-dep=yes" in j for j in jobs[1:])
    assert all("--parsable" in j and "--partition=gpu" in j and "--gpus-per-node=1" in j and "--account=abc" in j
               for j in jobs)
    assert [option_value(j, "--time") for j in jobs] == ["10:00:00", "2:00:00", "2:00:00", "2:00:00"]

    graph = graph_of(path)
    script = jobs[1][-1]
    text = open(script).read()
    assert f"cd {ROOT}" in text and "scripts/reproduce.py --exec-task" in text and "${SLURM_ARRAY_TASK_ID}" in text
    tasks_file = text.split("--exec-task ")[1].split()[0]
    tasks = [json.loads(line) for line in open(tasks_file)]
    assert [t["key"] for t in tasks] == [s.key for s in graph.stages.values() if s.stage == "prune"]
    assert tasks[0]["command"] == graph.stages[tasks[0]["key"]].command(str(stub))

    # one array task, as SLURM would start it: the stage's command with its markers
    assert reproduce.main(["--exec-task", tasks_file, "1"]) == 0
    assert calls(stub.parent) == [" ".join(tasks[1]["command"][1:])]
    markers = state.Markers(state.state_root(graph.plan.result_dir))
    assert markers.running(tasks[1]["key"]) is None and markers.failed(tasks[1]["key"]) is None
    assert "job array 4103 with 5 task(s), after job 4102" in capsys.readouterr().out


def option_value(args, name):
    found = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return found[0] if found else None


def test_slurm_resubmission_skips_done_stages_and_refuses_while_stages_run(tmp_path, fake_sbatch):
    path = write_plan(tmp_path, methods=["dense", "LWM"])
    graph = graph_of(path)
    pretrain, pretrain_test, lwm, lwm_test = graph.stages.values()
    finish_train(pretrain)
    finish_test(pretrain_test)
    assert reproduce.main([path, "--slurm"]) == 0
    jobs = submitted(fake_sbatch)
    assert [option_value(j, "--job-name") for j in jobs] == ["harp-t-finetune", "harp-t-test"]
    assert option_value(jobs[0], "--dependency") is None and option_value(jobs[1], "--dependency") == "afterok:4100"
    assert "--gpus-per-node=1" not in jobs[0]

    state.Markers(state.state_root(graph.plan.result_dir)).start(lwm.key, ["x"])
    with pytest.raises(UserError, match="running"):
        slurm.submit(graph, "python", state.Markers(state.state_root(graph.plan.result_dir)), {}, say=lambda s: None)


def test_multi_gpu_train_tasks_run_under_torchrun(tmp_path):
    graph = graph_of(write_plan(tmp_path, methods=["dense"]))
    pretrain, pretrain_test = graph.stages.values()
    markers = state.Markers(str(tmp_path / "m"))
    assert slurm._task(pretrain, "py", markers, 4)["command"][:5] == ["py", "-m", "torch.distributed.run",
                                                                      "--standalone", "--nproc-per-node=4"]
    assert slurm._task(pretrain_test, "py", markers, 4)["command"][:2] == ["py", "test.py"]


@pytest.mark.parametrize("fields,words", [
    ({"seeds": ["abc"]}, "seeds must be distinct non-negative integers"),
    ({"seeds": [1.7]}, "seeds must be distinct non-negative integers"),
    ({"slurm": {"gpus": "two"}}, "slurm gpus must be an integer >= 0, got 'two'"),
    ({"slurm": {"time": {"prune": [1]}}}, "slurm time.prune must be text"),
    ({"slurm": {"time": {"pretrian": "1:00:00"}}}, "unknown stage 'pretrian'"),
    ({"flags": {"test": {"attacks": "pgd10,deepfoo"}}}, "unknown attack 'deepfoo'"),
    ({"flags": {"test": {"epsilons": "0.1,abc"}}}, "bad value 'abc' in --epsilons"),
    ({"flags": {"train": {"no_progress": "maybe"}}}, "bad value 'maybe' for no_progress"),
    ({"flags": {"train": {"epochs": 2.5}}}, "bad value 2.5 for epochs"),
    ({"granularities": {"weight": [0.1, 1.5]}}, "give k values in (0, 1]"),
    ({"granularities": {"weight": ["abc"]}}, "k must be numbers"),
])
def test_a_bad_plan_fails_its_dry_run_with_one_line(tmp_path, capsys, fields, words):
    path = write_plan(tmp_path, **fields)
    assert reproduce.main([path, "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reproduce.py: error: ") and words in lines[0]
    assert len(lines[0].replace(path, "PLAN")) <= 200


# ----------------------------------------------------------------------------------------------- estimate
def test_estimate_follows_the_documented_formula(tmp_path):
    path = write_plan(tmp_path, methods=["dense"], flags={"pretrain": {"epochs": 2},
                                                          "test": {"attacks": "natural,pgd10,autoattack",
                                                                   "autoattack_points": 100}})
    graph = graph_of(path)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"arch": "small_cnn", "input_shape": [1, 8, 8], "device": "cpu",
                                 "images_per_s": {"plain_train": 1000.0, "pgd10_at": 100.0, "pgd10_harp_prune": 80.0,
                                                  "forward_plain": 5000.0}, "R3": 1.0}))
    pretrain, test = graph.stages.values()
    benches = [estimate.load_bench(str(bench))]
    startup = estimate.STARTUP_SECONDS
    # 2 epochs x 1437 images x 1/100 s, plus 2 validations x 360 images x (PGD-10 attack 0.01 - 0.001 + 2 forwards)
    assert estimate.stage_cost(pretrain, benches).hours * 3600 == pytest.approx(
        startup + 2 * 1437 / 100 + 2 * 360 * 0.0094)
    # 360 test images x (natural 1 + PGD-10 21 forward-equivalents) x 1/5000 s, AutoAttack on the first 100 only
    # (without pgd10_eval in the benchmark an attack step is 2 forwards)
    autoattack = 1 + 2 * estimate.attack_steps("autoattack")
    assert estimate.stage_cost(test, benches).hours * 3600 == pytest.approx(
        startup + 360 * 22 / 5000 + 100 * autoattack / 5000)
    # With them measured: a tenth of pgd10_eval per attack step, and Fast-AT's own step
    rates = {"plain_train": 1000.0, "pgd10_at": 100.0, "pgd10_harp_prune": 80.0, "forward_plain": 5000.0,
             "pgd10_eval": 200.0, "fast_at": 400.0}
    bench.write_text(json.dumps({"arch": "small_cnn", "input_shape": [1, 8, 8], "device": "cpu",
                                 "images_per_s": rates, "R3": 1.0}))
    measured = [estimate.load_bench(str(bench))]
    assert estimate.stage_cost(test, measured).hours * 3600 == pytest.approx(
        startup + 360 * (2 / 5000 + 10 / 2000) + 100 * (1 / 5000 + estimate.attack_steps("autoattack") / 2000))
    fast = graph_of(write_plan(tmp_path, objectives=["fast"], methods=["dense"], flags={"pretrain": {"epochs": 2}}))
    fast_pretrain = next(s for s in fast.stages.values() if s.kind == "train")
    assert estimate.stage_cost(fast_pretrain, measured).hours * 3600 == pytest.approx(
        startup + 2 * 1437 / 400 + 2 * 360 * (1 / 100 - 1 / 1000 + 2 / 5000))
    lines = estimate.report(graph, benches)
    assert any("device hours" in line for line in lines)
    missing = estimate.report(graph, [])
    assert any("scripts/benchmark.py --device cuda --arch small_cnn --dataset digits" in line for line in missing)
    assert any("s_adv(K)" in line for line in missing)  # the formula, for want of a benchmark


def test_estimate_prices_the_ap_preset_as_it_runs(tmp_path):
    """`all` under the AP preset is natural, AutoAttack and FMN, on at most the first 10,000 test points (SVHN's
    26,032 are not all evaluated), with FMN's 32 tuning trials of 100 steps on 64 points and 200 steps on 128."""
    path = write_plan(tmp_path, datasets=["CIFAR10", "SVHN"], archs=["resnet18"], methods=["dense"],
                      flags={"test": {"attack_preset": "ap"}})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"arch": "resnet18", "input_shape": [3, 32, 32], "device": "cuda",
                                 "images_per_s": {"plain_train": 1000.0, "pgd10_at": 100.0, "pgd10_harp_prune": 80.0,
                                                  "forward_plain": 5000.0}, "R3": 1.0}))
    benches = [estimate.load_bench(str(bench))]
    tests = [s for s in graph_of(path).stages.values() if s.kind == "test"]
    # (no pgd10_eval in the benchmark: an attack step costs two forwards)
    fmn = 32 * 64 * (1 + 2 * 100) + 128 * (1 + 2 * 200)
    autoattack = 1 + 2 * estimate.attack_steps("autoattack")
    expected = estimate.STARTUP_SECONDS + (10_000 * (1 + autoattack) + fmn) / 5000
    assert [estimate.stage_cost(s, benches).hours * 3600 for s in tests] == pytest.approx([expected, expected])
    assert estimate.fmn_work(tests[0].cfg, 10_000) == (32 * 64 + 128, 32 * 64 * 100 + 128 * 200)


def test_estimate_of_the_certified_objectives_follows_the_documented_formula(tmp_path):
    flags = {"pretrain": {"epochs": 4, "val_every": 4}, "crown-ibp+pretrain": {"schedule_length": 3},
             "mixtrain+pretrain": {"mixtrain_k": 2, "batch_size": 50},
             "test": {"attacks": "natural,certify,ibp,sym,crown-ibp", "certify_n": 100, "certify_n0": 10,
                      "n_examples": 10}}
    graph = graph_of(write_plan(tmp_path, archs=["cifar_model"], objectives=["smooth", "crown-ibp", "mixtrain"],
                                methods=["dense"], flags=flags))
    bench = tmp_path / "bench.json"
    rates = {"plain_train": 1000.0, "pgd10_at": 100.0, "pgd10_harp_prune": 80.0, "forward_plain": 5000.0,
             "smooth_train": 500.0, "crown_ibp_train": 50.0, "ibp_train": 400.0, "sym_train": 4.0,
             "ibp_verify": 2000.0, "sym_verify": 20.0, "crown_ibp_verify": 200.0, "certify_draws": 4000.0}
    bench.write_text(json.dumps({"arch": "cifar_model", "input_shape": [1, 8, 8], "device": "cpu",
                                 "images_per_s": rates, "R3": 1.0}))
    benches = [estimate.load_bench(str(bench))]
    seconds = {(s.kind, s.cfg.trainer): estimate.stage_cost(s, benches).hours * 3600 for s in graph.stages.values()}
    train = 4 * 1437   # 4 epochs of the digits training set; one validation on the 360 test images
    seconds = {key: value - estimate.STARTUP_SECONDS for key, value in seconds.items()}
    assert seconds[("train", "smooth")] == pytest.approx(train / 500 + 360 * 11 / 5000)
    # beta > 0 in epochs 0 and 1 of a 3-epoch ramp
    assert seconds[("train", "crown-ibp")] == pytest.approx(1437 * (2 / 50 + 2 / 400) + 360 * (1 / 2000 + 1 / 5000))
    assert seconds[("train", "mixtrain")] == pytest.approx(train * (1 / 1000 + 0.8 * 2 / 4 / 50)
                                                           + 360 * (1 / 20 + 1 / 5000))
    # 10 points: natural 1 forward, certify 10 + 2 * 100 draws, then each bound's verification
    test = 10 * (1 / 5000 + 210 / 4000 + 1 / 2000 + 1 / 20 + 1 / 200)
    assert all(seconds[("test", trainer)] == pytest.approx(test) for trainer in ("smooth", "crown-ibp", "mixtrain"))
