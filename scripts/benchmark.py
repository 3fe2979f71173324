"""Speed ratios of the training and export paths, measured in one process (README, Speed and scale).

    python scripts/benchmark.py --device cpu --arch vgg16_bn --batch-size 32 --out bench.json
    python scripts/benchmark.py --device cuda --arch resnet18 --batch-size 512 --bf16 --channels-last

Every configuration runs the code users run: one step is the stage's training loop (trainers.training) over a
single batch (objective, regularizers, zero_grad, backward, optimizer step), PGD-AT under
ThreatModel(eps=0.031, step_size=0.0078, steps=10) or natural training; every stage is built by the stage builder
train.py builds it with (stage.build_stage: the recipe's masks, start rates, trainable parameters, hardware loss
and frozen masks), each started from the model of the stage before it held in memory; pruning.wrap.dense_state_dict
for the export.

Configurations (the same batch for all of them: uniform random images, or real test images with --data-dir):
  plain_train          plain nn layers, everything trainable, natural objective       (pretrain, no attack)
  pgd10_at             the same model, PGD-10 AT                                       (pretrain)
  pgd10_plain_frozen_w a copy with plain layers, conv/linear weights frozen, BN trainable, PGD-10 AT
  pgd10_harp_prune     the same copy masked as in harp_prune: W frozen, scores + rates trainable,
                       BN trainable, gamma * hardware loss on, PGD-10 AT
  finetune_train       the masked copy with frozen masks (finetune mode), weights trainable, natural
  fast_at              the plain model, --trainer fast (Fast-AT: one random-start FGSM step, then the update)
  forward_plain        eval forward of the plain model (fp32, no grad, as test.py evaluates)
  pgd10_eval           test.py's PGD-10 on the plain model in eval mode (no update): a tenth of it is one attack
                       step per image, the unit scripts/reproduction/estimate.py prices attacks in
  forward_dense_export eval forward of a fresh plain model loaded with dense_state_dict(masked model)

Hydra's certified objectives, when the bounds can walk the model (a plain Sequential such as cifar_model), on the
plain model at --epsilon. The bounds' cost grows with the unstable ReLUs, which depend on the images: give
--data-dir for real test images (the batch of every configuration; MNIST's black background keeps many ReLUs of a
random model unstable, uniform noise few); a random model is then a pessimistic stand-in for a trained one:
  smooth_train         --trainer smooth (Hydra's KL loss: a clean and a noisy forward)
  crown_ibp_train      --trainer crown-ibp while eps ramps (beta > 0: the CROWN pass and IBP)
  ibp_train            --trainer crown-ibp after the ramp (beta = 0: IBP only)
  sym_train            the symbolic-interval robust loss and its backward on SYMBOLIC_POINTS points (MixTrain's
                       extra term; its step adds 0.8 --mixtrain-k of these points to a plain step)
  ibp_verify, sym_verify, crown_ibp_verify   verified() on the batch (sym: on SYMBOLIC_POINTS points), as test.py
  certify_draws        CERTIFY_DRAWS noisy copies of one image classified and counted as certify draws them (the
                       cost of one draw: certify and PREDICT take N0 + 2N per point)

Ratios (each a ratio of medians): R1 = pgd10_at / plain_train, R2 = pgd10_harp_prune / pgd10_plain_frozen_w,
R3 = finetune_train / plain_train, R4 = forward_dense_export / forward_plain; R4_max_abs_diff = max |logits of
the masked model - logits of the export|. A model without norm layers (cifar_model) has no pgd10_plain_frozen_w
(nothing to train under frozen weights) and no R2.

`compact` (unless --no-compact): the plain model channel-pruned at k = COMPACT_K as lwm_finetune sets it up
(magnitude scores, every layer at k, residual rates tied, masks frozen), exported by pruning.compact.compact_model;
its MAC ratio (dense / compact), parameters, max |logit difference| against the masked model, and the eval forward
of the plain model against the compact one, timed like the others (forward_plain / forward_compact = `speedup`,
reported next to `mac_ratio`). `paired_round_ratios` (the median of the per-round ratios) is a
diagnostic that is less sensitive to load bursts on a shared machine. On CUDA also the measured bf16 matmul
rate (8192^3 probe) and MFU = 23 F * (images/s of pgd10_at) / matmul rate, F = forward FLOPs per image from
pruning.graph.inspect_layers.

--compile wraps the training and attack models in torch.compile as train.py --compile does (warm-up rounds
absorb the compilation); the eval forwards of R4 stay eager, as test.py runs them.

Timing: warm-up steps first, then rounds in which every configuration runs once, the order rotating from
round to round, so that drift of a shared machine hits every configuration alike; each value is the median
over the rounds. CUDA is synchronised before every clock reading.
"""
import argparse
import copy
from dataclasses import replace
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from configs.errors import UserError  # noqa: E402
from configs.schema import Config  # noqa: E402
from data import build_data  # noqa: E402
from data.info import dataset_info, dataset_names  # noqa: E402
from models import list_models  # noqa: E402
from pruning.compact import compact_model, count_macs  # noqa: E402
from pruning.graph import inspect_layers  # noqa: E402
from pruning.trainable import set_trainable  # noqa: E402
from pruning.wrap import RATE_KEY, SCORE_KEY, dense_state_dict  # noqa: E402
from stage import Source, build_model, build_stage, make_optimizer  # noqa: E402
from trainers.attacks.pgd import pgd  # noqa: E402
from trainers.attacks.threat import ThreatModel  # noqa: E402
from trainers.certify.bounds import CROWN_IBP, IBP, SYMBOLIC, bound_steps, verified, worst_case_loss  # noqa: E402
from trainers.certify.smoothing import sample_counts  # noqa: E402
from trainers.training import TRAINERS  # noqa: E402
from utils.modes import eval_mode  # noqa: E402

THREAT = ThreatModel(eps=0.031, step_size=0.0078, steps=10)
# Switches that make each stage's config train as the configuration above describes.
RECIPE_SWITCHES = {"pretrain": dict(trainer="adv", adv_loss="pgd"),
                   "harp_prune": dict(trainer="adv", adv_loss="pgd", scaled_score_init=True, rate_stg_init=True,
                                      soft_hw=True),
                   "harp_finetune": dict(trainer="base", adv_loss="nat")}
# The project's CPU speed thresholds (README, Benchmark) (R2's is for batch 32); reported next to the values, never enforced here.
THRESHOLDS = {"R1": 8.0, "R2": 1.20, "R3": 1.05, "R4": 1.02}
# Each ratio's (numerator, denominator) configuration.
RATIOS = {"R1": ("pgd10_at", "plain_train"), "R2": ("pgd10_harp_prune", "pgd10_plain_frozen_w"),
          "R3": ("finetune_train", "plain_train"), "R4": ("forward_dense_export", "forward_plain")}
# harp_prune as the CIFAR seed command configures it: k 0.01, alpha 0.1, start rates 010_uni, gamma 0.01.
K, ALPHA, START_KEEP, GAMMA = 0.01, 0.1, 0.10, 0.01
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4
# Channel keep rate of the compact export (the AP benchmark's 50 % structured sparsity).
COMPACT_K = 0.5
# Points of the symbolic configurations (each costs hundreds of forwards); noisy copies of certify_draws (its batch,
# EvalSettings' certify_batch_size) at Hydra's sigma.
SYMBOLIC_POINTS = 4
CERTIFY_DRAWS, CERTIFY_SIGMA = 1000, 0.25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of an n^3 product on `device` (CUDA only)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return 2.0 * n ** 3 * iters / seconds / 1e12


def _train_step(loop, model: nn.Module, optimizer, batch, device, *, bf16: bool, channels_last: bool,
                regularizers=(), attack_model: Optional[nn.Module] = None) -> Callable[[], None]:
    """One optimizer step exactly as train.py runs it: the stage's loop over a one-batch epoch."""
    attack_model = model if attack_model is None else attack_model

    def step():
        loop.train_epoch(model, attack_model, [batch], optimizer, epoch=0, num_batches=1, device=device,
                         regularizers=list(regularizers), bf16=bf16, channels_last=channels_last,
                         print_freq=10 ** 9, show_progress=False)
    return step


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward():
        with torch.no_grad():
            return model(x)
    return forward


def benchmark_batch(info, batch_size: int, device: torch.device, data_dir: Optional[str] = None):
    """The first `batch_size` test images of the dataset in data_dir, else uniform random images and labels."""
    shape = (info.in_channels, info.image_size, info.image_size)
    if data_dir is None:
        return (torch.rand(batch_size, *shape, device=device),
                torch.randint(0, info.num_classes, (batch_size,), device=device))
    x, y = next(iter(build_data(info.name, data_dir=data_dir).test_batches(batch_size)))
    if len(y) < batch_size:
        raise UserError(f"--batch-size {batch_size}: the test set in {data_dir} has only {len(y)} images")
    return x.to(device), y.to(device)


def build(arch: str, dataset: str, batch_size: int, device: torch.device, *, bf16: bool = False,
          channels_last: bool = False, compile: bool = False, seed: int = 0, threat: ThreatModel = THREAT,
          data_dir: Optional[str] = None) -> Dict:
    """The models, one callable per configuration and the images each call processes (see the module
    docstring)."""
    info = dataset_info(dataset)
    torch.manual_seed(seed)
    shape = (info.in_channels, info.image_size, info.image_size)
    batch = benchmark_batch(info, batch_size, device, data_dir)
    x, y = batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # The stages' configs: harp_prune as the CIFAR seed command configures it, its finetune, and pretrain.
    common = dict(arch=arch, dataset=info.name, num_classes=info.num_classes, k=K, alpha=ALPHA, stg_id="010_uni",
                  gamma=GAMMA, lr=LR, momentum=MOMENTUM, wd=WD, seed=seed, epsilon=threat.eps,
                  step_size=threat.step_size, num_steps=threat.steps)
    configs = {mode: Config(exp_mode=mode, **common, **RECIPE_SWITCHES[mode]) for mode in RECIPE_SWITCHES}
    pretrain = build_stage(configs["pretrain"], info, device, threat)
    plain = pretrain.model
    frozen_w = copy.deepcopy(plain)     # plain layers, weights frozen: R2's denominator
    set_trainable(frozen_w, weights=False, scores=False, rates=False, norm_layers=True)
    example = torch.zeros(1, *shape, device=device)
    forward_flops = sum(layer.flops for layer in inspect_layers(plain, example).layers.values())
    natural_loop = TRAINERS.get("base")(replace(configs["pretrain"], adv_loss="nat"), threat, device)
    # harp_prune from the plain model's weights (masked; magnitude scores, 010_uni rates, hw loss)
    prune = build_stage(configs["harp_prune"], info, device, threat, source=Source.of_model(plain, "the plain model"))
    masked = prune.model
    for hook in prune.parts.hooks.values():
        hook.before_epoch(0)            # gamma of the first epoch: gamma0
    # finetune from the pruned model: the same masks, weights trainable, masks frozen (pruned weights zeroed once)
    finetune_stage = build_stage(configs["harp_finetune"], info, device, threat,
                                 source=Source.of_model(masked, "the pruned model"))
    finetune, finetune_parts = finetune_stage.model, finetune_stage.parts

    for model in (plain, frozen_w, masked, finetune):
        model.to(memory_format=memory_format)
    frozen_params = [p for p in frozen_w.parameters() if p.requires_grad]

    def wrapped(model):
        """(training model, attack model) as train.py wires them under --compile."""
        return (torch.compile(model), torch.compile(model)) if compile else (model, model)

    flags = dict(bf16=bf16, channels_last=channels_last)
    plain_t, plain_a = wrapped(plain)
    frozen_t, frozen_a = wrapped(frozen_w)
    masked_t, masked_a = wrapped(masked)
    finetune_t, finetune_a = wrapped(finetune)
    train_steps = {
        "plain_train": _train_step(natural_loop, plain_t, pretrain.parts.optimizer, batch, device,
                                   attack_model=plain_a, **flags),
        "pgd10_at": _train_step(pretrain.parts.loop, plain_t, pretrain.parts.optimizer, batch, device,
                                attack_model=plain_a, **flags),
        "pgd10_harp_prune": _train_step(prune.parts.loop, masked_t, prune.parts.optimizer, batch, device,
                                        attack_model=masked_a, regularizers=prune.parts.regularizers.values(),
                                        **flags),
        "finetune_train": _train_step(finetune_parts.loop, finetune_t, finetune_parts.optimizer, batch, device,
                                      attack_model=finetune_a, **flags),
    }
    fast = TRAINERS.get("fast")(replace(configs["pretrain"], trainer="fast"), threat, device)
    train_steps["fast_at"] = _train_step(fast, plain_t, pretrain.parts.optimizer, batch, device, attack_model=plain_a,
                                         **flags)
    if frozen_params:  # a model without norm layers has nothing to train under frozen weights: no R2
        train_steps["pgd10_plain_frozen_w"] = _train_step(
            pretrain.parts.loop, frozen_t, make_optimizer(configs["pretrain"], frozen_params), batch, device,
            attack_model=frozen_a, **flags)
    counts = {name: batch_size for name in train_steps}
    if _boundable(plain):
        certified, certified_counts = certified_steps(configs["pretrain"], plain, pretrain.parts.optimizer, batch,
                                                      device, threat, **flags)
        train_steps.update(certified)
        counts.update(certified_counts)
    return {"info": info, "configs": configs, "shape": shape, "batch": batch, "plain": plain, "masked": masked,
            "forward_flops": forward_flops, "train_steps": train_steps, "counts": counts,
            "memory_format": memory_format}


def _boundable(model: nn.Module) -> bool:
    try:
        bound_steps(model)
    except UserError:
        return False
    return True


def certified_steps(cfg: Config, model: nn.Module, optimizer, batch, device: torch.device, threat: ThreatModel,
                    **flags) -> Tuple[Dict[str, Callable], Dict[str, int]]:
    """The certified configurations of the module docstring, and the images each call processes."""
    x, y = batch
    steps = {
        "smooth_train": _train_step(TRAINERS.get("smooth")(replace(cfg, trainer="smooth"), threat, device), model,
                                    optimizer, batch, device, **flags),
        # epoch 0 of a two-epoch ramp: beta = 1, the CROWN pass runs; no ramp: beta = 0, IBP alone
        "crown_ibp_train": _train_step(TRAINERS.get("crown-ibp")(replace(cfg, trainer="crown-ibp", schedule_length=2),
                                                                 threat, device), model, optimizer, batch, device,
                                       **flags),
        "ibp_train": _train_step(TRAINERS.get("crown-ibp")(replace(cfg, trainer="crown-ibp", schedule_length=0),
                                                           threat, device), model, optimizer, batch, device, **flags),
    }
    points = (x[:SYMBOLIC_POINTS], y[:SYMBOLIC_POINTS])
    # The bounds' cost depends on the weights (unstable ReLUs): measured on a copy the training configurations, which
    # fit the plain model to this very batch, never touch.
    untrained = copy.deepcopy(model)

    def symbolic_train():
        untrained.zero_grad(set_to_none=True)
        worst_case_loss(untrained, *points, eps=threat.eps, method=SYMBOLIC)[0].backward()

    def verify(method: str, inputs, labels):
        return lambda: verified(untrained, inputs, labels, eps=threat.eps, method=method)

    def certify_draws():
        with eval_mode(untrained), torch.no_grad():
            sample_counts(untrained, x[:1], sigma=CERTIFY_SIGMA, num=CERTIFY_DRAWS, batch_size=CERTIFY_DRAWS,
                          num_classes=int(cfg.num_classes)).sum().item()  # the count reaches the host, as certify's

    steps.update(sym_train=symbolic_train, ibp_verify=verify(IBP, x, y), sym_verify=verify(SYMBOLIC, *points),
                 crown_ibp_verify=verify(CROWN_IBP, x, y), certify_draws=certify_draws)
    counts = {name: len(x) for name in steps}
    counts.update(sym_train=len(points[0]), sym_verify=len(points[0]), certify_draws=CERTIFY_DRAWS)
    return steps, counts


def export_models(built: Dict, arch: str, device: torch.device):
    """Eval-mode plain model and a fresh plain model holding dense_state_dict(masked)."""
    info = built["info"]
    export = build_model(built["configs"]["pretrain"], info, device, masked=False)
    export.load_state_dict(dense_state_dict(built["masked"]), strict=True)
    export.to(memory_format=built["memory_format"])
    plain, masked = built["plain"], built["masked"]
    for model in (plain, masked, export):
        model.eval()
    return plain, masked, export


def compact_models(built: Dict, device: torch.device):
    """The plain model channel-pruned at COMPACT_K as lwm_finetune sets it up (magnitude scores, uniform rates tied
    across residual shortcuts, frozen masks) and its compact export, both in eval mode."""
    cfg = replace(built["configs"]["harp_finetune"], exp_mode="lwm_finetune", prune_reg="channel", k=COMPACT_K,
                  scaled_score_init=True, rate_stg_init=False)
    masked = build_stage(cfg, built["info"], device, THREAT,
                         source=Source.of_model(built["plain"], "the plain model")).model.eval()
    example = torch.zeros(1, *built["shape"], device=device)
    return masked, compact_model(masked, example).to(memory_format=built["memory_format"])


def compact_speedup(reference: nn.Module, compact: nn.Module, x: torch.Tensor, *, warmup: int, repeats: int,
                    device: torch.device) -> Dict:
    """Eval forwards of `reference` and `compact` on `x`, interleaved: median seconds, images/s and the speed-up."""
    samples = interleaved({"forward_reference": _forward(reference, x), "forward_compact": _forward(compact, x)},
                          warmup=warmup, repeats=repeats, device=device)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    return {"seconds": seconds, "samples": samples,
            "images_per_s": {name: x.shape[0] / value for name, value in seconds.items()},
            "speedup": seconds["forward_reference"] / seconds["forward_compact"]}


def compact_report(built: Dict, plain: nn.Module, x: torch.Tensor, *, warmup: int, repeats: int,
                   device: torch.device) -> Dict:
    """The `compact` entry of the result (see the module docstring)."""
    masked, compact = compact_models(built, device)
    example = torch.zeros(1, *built["shape"], device=device)
    macs, compact_macs = count_macs(plain, example), count_macs(compact, example)
    with torch.no_grad():
        max_abs_diff = float((masked(x) - compact(x)).abs().max())
    timing = compact_speedup(plain, compact, x, warmup=warmup, repeats=repeats, device=device)
    return {"k": COMPACT_K, "prune_reg": "channel", "macs": macs, "compact_macs": compact_macs,
            "mac_ratio": macs / compact_macs,
            "params": sum(p.numel() for n, p in masked.named_parameters() if not n.endswith((SCORE_KEY, RATE_KEY))),
            "compact_params": sum(p.numel() for p in compact.parameters()), "max_abs_diff": max_abs_diff, **timing,
            "speedup_over_mac_ratio": timing["speedup"] / (macs / compact_macs)}


def interleaved(steps: Dict[str, Callable], *, warmup: int, repeats: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each callable over `repeats` rounds after `warmup` untimed rounds; the order rotates per round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _sync(device)
    samples = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def run(arch: str = "vgg16_bn", dataset: str = "CIFAR10", batch_size: int = 32, device: str = "cpu", *,
        bf16: bool = False, channels_last: bool = False, compile: bool = False, warmup: int = 2, steps: int = 7,
        forward_repeats: Optional[int] = None, matmul_probe: bool = True, seed: int = 0, compact: bool = True,
        epsilon: float = THREAT.eps, data_dir: Optional[str] = None) -> Dict:
    """Build every configuration, time it, and return the result dict that main() writes as JSON."""
    dev = torch.device(device)  # cudnn.benchmark is left as train.py leaves it (off)
    threat = THREAT.with_(eps=epsilon, step_size=epsilon / 4) if epsilon != THREAT.eps else THREAT
    built = build(arch, dataset, batch_size, dev, bf16=bf16, channels_last=channels_last, compile=compile, seed=seed,
                  threat=threat, data_dir=data_dir)
    train_samples = interleaved(built["train_steps"], warmup=warmup, repeats=steps, device=dev)

    plain, masked, export = export_models(built, arch, dev)
    x = built["batch"][0].contiguous(memory_format=built["memory_format"])
    with torch.no_grad():
        max_abs_diff = float((masked(x) - export(x)).abs().max())
    y = built["batch"][1]
    forward_samples = interleaved({"forward_plain": _forward(plain, x), "forward_dense_export": _forward(export, x),
                                   "pgd10_eval": lambda: pgd(plain, x, y, threat)},
                                  warmup=warmup, repeats=forward_repeats or 3 * steps, device=dev)

    samples = {**train_samples, **forward_samples}
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    pairs = {k: v for k, v in RATIOS.items() if all(name in seconds for name in v)}
    ratios = {k: seconds[num] / seconds[den] for k, (num, den) in pairs.items()}
    # Diagnostic: the median over rounds of each round's own ratio (both sides timed in the same round).
    paired = {k: statistics.median(a / b for a, b in zip(samples[num], samples[den])) for k, (num, den) in pairs.items()}
    info = built["info"]
    result = {
        "device": dev.type, "device_name": device_name(dev), "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "arch": arch, "dataset": info.name, "input_shape": list(built["shape"]),
        "num_classes": info.num_classes, "batch_size": batch_size, "bf16": bf16, "channels_last": channels_last,
        "compile": compile, "dtype": "bfloat16 autocast (training steps)" if bf16 else "float32",
        "eval_dtype": "float32", "warmup_rounds": warmup, "timed_rounds": steps,
        "threat": {"eps": threat.eps, "step_size": threat.step_size, "steps": threat.steps},
        "images": "uniform random" if data_dir is None else f"the first test images in {data_dir}",
        "harp_prune": {"k": K, "alpha": ALPHA, "start_keep": START_KEEP, "gamma": GAMMA, "prune_reg": "weight"},
        "forward_gflop_per_image": built["forward_flops"] / 1e9,
        "seconds": seconds, "samples": samples,
        "images_per_s": {name: built["counts"].get(name, batch_size) / s for name, s in seconds.items()},
        **ratios, "R4_max_abs_diff": max_abs_diff, "paired_round_ratios": paired,
        "thresholds_cpu": dict(THRESHOLDS),
        "within_thresholds": {**{k: ratios[k] <= v for k, v in THRESHOLDS.items() if k in ratios},
                              "R4_max_abs_diff": max_abs_diff == 0},
    }
    if compact:
        result["compact"] = compact_report(built, plain, x, warmup=warmup, repeats=forward_repeats or 3 * steps,
                                           device=dev)
    if dev.type == "cuda" and matmul_probe:
        rate = matmul_tflops(dev)
        achieved = 23.0 * built["forward_flops"] * result["images_per_s"]["pgd10_at"] / 1e12
        result.update(matmul_bf16_tflops=rate, pgd10_at_tflops=achieved, mfu_pgd10_at=achieved / rate)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--arch", default="vgg16_bn", help="registered architecture (default vgg16_bn)")
    parser.add_argument("--dataset", default="CIFAR10", help="input shape and classes of this dataset (default CIFAR10: 3x32x32, 10)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in the training steps (eval stays fp32)")
    parser.add_argument("--channels-last", "--channels_last", action="store_true", help="channels_last models and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models, as train.py --compile")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (>= 2)")
    parser.add_argument("--steps", type=int, default=7, help="timed rounds; each value is their median (>= 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=THREAT.eps, help="Linf eps of PGD and of the certified "
                        f"configurations' bounds (default {THREAT.eps})")
    parser.add_argument("--data-dir", "--data_dir", default=None, help="the batch: the first test images of "
                        "--dataset found here (default: uniform random images)")
    parser.add_argument("--no-compact", action="store_true", help="skip the compact channel export's speed-up")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 2:
        parser.error("--warmup must be >= 2")
    if args.steps < 5:
        parser.error("--steps must be >= 5 (the ratios are medians of at least 5 timed steps)")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.epsilon < 0:
        parser.error("--epsilon must be >= 0")
    if args.arch not in list_models():
        parser.error(f"unknown --arch {args.arch!r}; choose one of: {', '.join(list_models())}")
    names = {n.lower(): n for n in dataset_names()}
    if args.dataset.lower() not in names:
        parser.error(f"unknown --dataset {args.dataset!r}; choose one of: {', '.join(dataset_names())}")
    args.dataset = names[args.dataset.lower()]
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"bad --device {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args.arch, args.dataset, args.batch_size, args.device, bf16=args.bf16,
                 channels_last=args.channels_last, compile=args.compile, warmup=args.warmup, steps=args.steps,
                 seed=args.seed, compact=not args.no_compact, epsilon=args.epsilon, data_dir=args.data_dir)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
