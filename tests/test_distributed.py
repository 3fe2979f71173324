"""DistributedDataParallel on the CPU (gloo): train.py under torchrun, and exact equivalence in the engine.

1. `python -m torch.distributed.run --nproc_per_node 2 train.py ...` against one process with the same global
   batch. BatchNorm statistics are per process on the CPU (SyncBatchNorm is GPU-only), so each BN layer
   normalises over 32 instead of 64 examples and the runs cannot agree bit for bit. Measured on digits
   (small_cnn, natural training, batch 64, 2 epochs, seeds 1, 2, 3, 1234):
   - at the preset lr 0.1 the training is chaotic: one process with 1 instead of 2 OpenMP threads (only the
     summation order changes) already moves the epoch-2 train loss by 4-11 % and natural accuracy by up to
     4 points, so no tolerance there would say anything about DDP;
   - at --lr 0.01 the thread count changes the train loss by < 1e-4 and the 2-process run differs from the
     single one by at most 0.4 % (epoch 1) / 2.5 % (epoch 2) in train loss and 2.8 / 0.3 points in natural
     accuracy. A run whose gradients were summed instead of averaged (lr 0.02 in one process) differs by
     21 % / 54 % in train loss.
   So the test uses --lr 0.01 and allows 5 % relative train loss and 5 points of natural accuracy (about 2x the
   largest measured gap, well below the 21 % of a gradient-scaling error).
2. Exactness where nothing is per-process: a BN-free masked model in harp_prune configuration (scores and
   rates trainable, hardware loss on), a few PGD steps of `trainers.engine.train_one_epoch` under DDP on each
   rank's half of fixed batches, against one process on the whole batches: the parameters agree to float
   rounding.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from data.sampling import padded_length
from pruning.budget import CostModel
from pruning.graph import inspect_layers
from pruning.init import init_scores_from_weights, set_keep_rates
from pruning.trainable import set_trainable
from pruning.wrap import masked_layers, sparsify
from trainers.attacks.threat import ThreatModel
from trainers.engine import train_one_epoch
from trainers.objectives import ObjectiveSettings, pgd_at
from trainers.regularizers import HardwareLoss
from utils.distributed import DistContext, all_reduce_sums
from tests.conftest import read_metrics as metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TRAIN = 1437
COMMON = ["--dataset", "digits", "--adv_loss", "nat", "--epochs", "2", "--batch-size", "64", "--lr", "0.01",
          "--no-progress"]
LOSS_RTOL = 0.05
ACC_ATOL = 5.0


# ----------------------------------------------------------------------------- 1. train.py under torchrun
def files_under(directory):
    return sorted(os.path.relpath(os.path.join(base, name), directory)
                  for base, _, names in os.walk(directory) for name in names)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    import train  # imported here: the spawned workers of test 2 import this module and need none of train.py

    result_dir = str(tmp_path_factory.mktemp("ddp"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *COMMON, "--result-dir", result_dir, "--exp-name", "two_ranks"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert train.main(COMMON + ["--result-dir", result_dir, "--exp-name", "one_process"]) == 0
    experiment = os.path.join(result_dir, "small_cnn", "digits", "nat")
    return {"root": result_dir, "ddp": os.path.join(experiment, "two_ranks"),
            "single": os.path.join(experiment, "one_process"), "stderr": proc.stderr}


def test_two_ranks_write_one_set_of_files(two_runs):
    expected = ["checkpoint/checkpoint.pth.tar", "checkpoint/model_best.pth.tar", "config.yaml", "metrics.jsonl",
                "train.log"]
    assert files_under(two_runs["ddp"]) == expected  # no second metrics file, checkpoint or temporary file
    assert files_under(two_runs["single"]) == expected
    assert sorted(os.listdir(os.path.dirname(two_runs["ddp"]))) == ["one_process", "two_ranks"]
    with open(os.path.join(two_runs["ddp"], "train.log")) as fh:
        log = fh.read()
    assert "(2 processes)" in log and log.count("epoch 2 ") == 1  # rank 1 logs nothing to the file
    ckpt = torch.load(os.path.join(two_runs["ddp"], "checkpoint", "checkpoint.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["finished"]
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # the unwrapped model is saved


def test_two_ranks_match_one_process_within_the_batchnorm_tolerance(two_runs):
    ddp, single = metrics(two_runs["ddp"]), metrics(two_runs["single"])
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single] == [1, 2]
    for a, b in zip(ddp, single):
        assert a["lr"] == b["lr"]
        # every rank gets the same number of examples: the epoch's permutation is wrapped to a multiple of 2
        assert b["train_examples"] == DIGITS_TRAIN and a["train_examples"] == padded_length(DIGITS_TRAIN, 2)
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_RTOL * b["train_loss"], (a, b)
        assert abs(a["natural_acc"] - b["natural_acc"]) <= ACC_ATOL, (a, b)
        # validation is sharded and all-reduced: the whole test set is counted once
        assert 0 <= a["robust_acc"] <= a["natural_acc"] <= 100
    assert ddp[-1]["train_loss"] < ddp[0]["train_loss"]


# ----------------------------------------------------------------------------- 2. exact equivalence in the engine
K = 0.3
STEPS = 3
BATCH = 16
GAMMA = 0.5
THREAT = ThreatModel(eps=0.1, step_size=0.025, steps=3, random_start=False)  # no random start: no per-rank noise


def masked_net():
    """conv/linear only (no BN), masked as harp_prune: W frozen, scores and rates trainable, hw loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    sparsify(model, "weight", keep_min=0.1 * K)
    cost = CostModel(model, inspect_layers(model, torch.zeros(1, 1, 8, 8)), "weight", K)
    init_scores_from_weights(model)
    set_keep_rates(model, {name: 0.5 for name, _ in masked_layers(model)})  # above K: the hw loss is active
    set_trainable(model, weights=False, scores=True, rates=True, norm_layers=True)
    return model, cost


def fixed_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def train_steps(model, attack_model, cost, batches):
    optimizer = torch.optim.SGD([p for p in attack_model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                                weight_decay=5e-4)
    return train_one_epoch(model, attack_model, batches, optimizer, pgd_at, ObjectiveSettings(threat=THREAT),
                           epoch=0, num_batches=len(batches), device=torch.device("cpu"),
                           regularizers=[HardwareLoss(cost, weight=GAMMA)], show_progress=False)


def _rank_worker(rank, world_size, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, cost = masked_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        # as the data sources shard: rank r takes every world_size-th example of each global batch
        mine = [(x[rank::world_size], y[rank::world_size]) for x, y in fixed_batches()]
        stats = train_steps(ddp, model, cost, mine)  # attacks run on the unwrapped module, as train.py does
        n = stats["train_examples"]
        totals = all_reduce_sums({"n": n, "loss": stats["train_loss"] * n, "hw": stats["hw_loss_mean"]},
                                 DistContext(rank, world_size), torch.device("cpu"))
        # Tear down in order (wrapper, then a barrier, then the group) so that no process exits while gloo
        # still has work in flight: that can abort a process at interpreter exit.
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"state": model.state_dict(), "loss": totals["loss"] / totals["n"],
                    "hw": totals["hw"] / world_size, "n": totals["n"],
                    "kept": [layer.kept_count() for _, layer in masked_layers(model)]}, out_path)


def test_ddp_steps_equal_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ranks = torch.load(out, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, cost = masked_net()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        stats = train_steps(model, model, cost, fixed_batches())
    finally:
        torch.set_num_threads(threads)
    single = model.state_dict()

    assert ranks["n"] == stats["train_examples"] == STEPS * BATCH
    assert ranks["loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
    assert ranks["hw"] == pytest.approx(stats["hw_loss_mean"], rel=1e-5)
    assert ranks["kept"] == [layer.kept_count() for _, layer in masked_layers(model)]
    assert set(ranks["state"]) == set(single)
    moved = [k for k in single if not torch.equal(single[k], start[k])]
    assert any(k.endswith("popup_scores") for k in moved) and any(k.endswith("k_score") for k in moved)
    for key, value in single.items():
        torch.testing.assert_close(ranks["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------- 3. the SLURM batch script
SBATCH = os.path.join(ROOT, "scripts", "slurm_harp.sbatch")


def fake_slurm_tools(bin_dir, hosts):
    """`scontrol show hostnames` printing `hosts`, and an `srun` that runs its command once, here."""
    os.makedirs(bin_dir, exist_ok=True)
    scontrol = os.path.join(bin_dir, "scontrol")
    with open(scontrol, "w") as fh:
        fh.write("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && printf '%s\\n' " + " ".join(hosts) + "\n")
    srun = os.path.join(bin_dir, "srun")
    with open(srun, "w") as fh:
        fh.write("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\nexec \"$@\"\n")
    for path in (scontrol, srun):
        os.chmod(path, 0o755)


def slurm_env(tmp_path, **extra):
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", HARP_ROOT=ROOT,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    for key in ("OMP_NUM_THREADS", "MASTER_PORT", "GPUS_PER_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_sbatch_script_launches_torchrun_on_every_node(tmp_path):
    fake_slurm_tools(str(tmp_path / "bin"), ["gpu-a01", "gpu-a02"])
    proc = subprocess.run(["bash", SBATCH, "--arch", "vgg16_bn", "--exp-name", "my run", "--k", "0.01"],
                          env=slurm_env(tmp_path, HARP_DRY_RUN="1"), cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-id=4242", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-a01:29742", "train.py", "--arch", "vgg16_bn", "--exp-name", "my\\", "run", "--k",
        "0.01"]
    assert "8 CPU thread(s) per process" in proc.stderr
    outside = subprocess.run(["bash", SBATCH], env={k: v for k, v in slurm_env(tmp_path).items() if k != "SLURM_JOB_ID"},
                             capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and "not inside a SLURM allocation" in outside.stderr


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_script_trains_on_one_node_with_two_processes(tmp_path):
    """The script's real command on a one-node 'allocation' of 2 CPU processes (c10d rendezvous, gloo)."""
    fake_slurm_tools(str(tmp_path / "bin"), ["127.0.0.1"])
    result_dir = str(tmp_path / "results")
    env = slurm_env(tmp_path, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
                    SLURM_CPUS_PER_TASK="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    proc = subprocess.run(["bash", SBATCH, "--dataset", "digits", "--adv_loss", "nat", "--epochs", "1", "--batch-size",
                           "64", "--data-fraction", "0.25", "--val-method", "base", "--no-progress",
                           "--result-dir", result_dir], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = os.path.join(result_dir, "small_cnn", "digits", "nat", "pretrain")
    (record,) = metrics(run_dir)
    assert record["train_examples"] == padded_length(int(0.25 * DIGITS_TRAIN), 2)
    with open(os.path.join(run_dir, "train.log")) as fh:
        assert "(2 processes)" in fh.read()
