"""CycleGAN training: `python -m pipeline.train --config configs/X.yaml key=value ...` (or under torchrun).

The loop reads like the algorithm: fetch an unpaired batch, run the step (G phase, D phase, update), then do
the maintenance that every rank agrees on by step number (metrics, samples, checkpoints, evaluation).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import dist
from pipeline.checkpoint import CheckpointError, CheckpointWriteError, find_latest_loadable, load_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.cyclegan import Discriminators, Generators, build_networks, build_objective
from pipeline.data import DataError, held_out, normalize, train_loader
from pipeline.evaluate import held_out_eval
from pipeline.image_pool import ImagePool
from pipeline.interop import load_reference_dir
from pipeline.models import uses_group_kernel_norm
from pipeline.optim import build_adam, lr_factor, set_lr
from pipeline.preemption import EXIT_STOPPED, StopFlag
from pipeline.recorder import make_recorder
from pipeline.samples import sample_grid
from pipeline.step import TrainStep
from pipeline.train_state import build_state, check_compatible, rank_state, restore_rank

log = logging.getLogger("pipeline.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or inf loss."""


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    evaluation: dict[str, float]
    run_id: str | None
    stopped: bool = False
    """A signal stopped the run after `step` (checkpointed); resuming continues it."""


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (allocator statistics: no device sync), else the host's peak RSS."""
    if device.type == "cuda":
        return {"perf/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"perf/peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _find_resume(cfg: DictConfig) -> tuple[str, dict[str, Any]] | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        found = find_latest_loadable(cfg.run_dir)
        return (str(found[0]), found[1]) if found else None
    return cfg.checkpoint.resume, load_checkpoint(cfg.checkpoint.resume)


class MetricMeter:
    """Sums loss tensors on the device between logs, so ordinary steps never wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.data_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], data_s: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value.float()
        self.steps += 1
        self.data_s += data_s

    def collect(self) -> dict[str, float]:
        """Loss means over the interval and over ranks (a collective: every rank calls it), then reset."""
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1) if keys else torch.zeros(0)
        means = dist.all_reduce_mean(means.to(self.device)).tolist()
        elapsed = time.perf_counter() - self.t0
        out = {f"loss/{k}": v for k, v in zip(keys, means)}
        out["perf/data_wait_share"] = self.data_s / max(elapsed, 1e-9)
        out["perf/steps_per_s"] = self.steps / max(elapsed, 1e-9)
        self.sums, self.steps, self.data_s, self.t0 = {}, 0, 0.0, time.perf_counter()
        return out


@dataclass
class Components:
    """The networks of one rank and the step that trains them (through DDP wrappers when distributed)."""

    gens: Generators
    discs: Discriminators
    step: TrainStep

    @property
    def nets(self) -> dict[str, torch.nn.Module]:
        return {"G_ab": self.gens.G_ab, "G_ba": self.gens.G_ba, "D_a": self.discs.D_a, "D_b": self.discs.D_b}


def build_components(cfg: DictConfig, info: dist.DistInfo, device: torch.device) -> Components:
    """Networks (identical on every rank: seeded from train.seed), optimisers, this rank's pools, DDP."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cpu":
        # Denormal activations appear after a few hundred GAN steps and make x86 CPUs up to 6x slower.
        torch.set_flush_denormal(True)
    else:
        torch.backends.cudnn.benchmark = True  # Fixed crop sizes: pick the fastest convolution once.
    torch.manual_seed(cfg.train.seed)
    gens, discs = build_networks(cfg.model, fused=cfg.train.fused_calls,
                                 group_kernel_norm=uses_group_kernel_norm(cfg.train.instance_norm_kernel, device))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    gens.to(device, memory_format=memory_format)
    discs.to(device, memory_format=memory_format)
    if cfg.train.compile:
        # D is called with and without requires_grad and on pooled inputs: each is a recompile (guards), so
        # the default limit of 8 is hit and dynamo silently falls back to eager. Raise it.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for net in (gens.G_ab, gens.G_ba, discs.D_a, discs.D_b):
            net.compile(backend=cfg.train.compile_backend)
    opt_g = build_adam(gens.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
    opt_d = build_adam(discs.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
    pool_seed = cfg.train.seed * 1000 + info.rank
    pool_a = ImagePool(cfg.train.pool_size, seed=2 * pool_seed)
    pool_b = ImagePool(cfg.train.pool_size, seed=2 * pool_seed + 1)
    # DDP averages gradients; D is called unwrapped and frozen in the G phase (never static_graph).
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        gens_call, discs_call = DDP(gens, device_ids=ids), DDP(discs, device_ids=ids)
    else:
        gens_call, discs_call = gens, discs
    step = TrainStep(gens_call, discs_call, discs, build_objective(cfg.loss), opt_g, opt_d, pool_a, pool_b,
                     device, cfg.train.precision, check_finite=cfg.train.max_nonfinite_steps > 0,
                     distributed=info.world_size > 1, memory_format=memory_format)
    return Components(gens, discs, step)


def run(cfg: DictConfig, stop_flag: StopFlag | None = None) -> RunResult:
    """Train as configured on this process's rank; returns the last logged metrics and evaluation.

    Args:
        cfg: the run's config (`load_config`).
        stop_flag: an installed StopFlag owned by the caller (a launcher that must not lose a stop signal that
            arrives while the run starts); by default run() installs its own around the loop.
    """
    # Initialize.
    info = dist.read_env()
    device = dist.select_device(cfg.train.device, info)
    dist.init_process_group(info, device)
    random.seed(cfg.train.seed * 1000 + info.rank)

    # Resume (before anything is written, so a bad checkpoint loses nothing).
    resume = _find_resume(cfg)
    if resume is not None:
        check_compatible(resume[1], cfg, resume[0])
    start_step = resume[1]["step"] if resume else 0
    images_seen = resume[1]["images_seen"] if resume else 0

    # Load data: the failure to find shards surfaces here, before the networks are built.
    loader = train_loader(cfg.data, cfg.train.seed, info.rank, start_batch=start_step,
                          pin_memory=device.type == "cuda")

    # Construct networks, optimisers and this rank's image pools; distribute.
    parts = build_components(cfg, info, device)
    gens, nets, step_fn = parts.gens, parts.nets, parts.step
    opt_g, opt_d, pool_a, pool_b = step_fn.opt_g, step_fn.opt_d, step_fn.pool_a, step_fn.pool_b
    if resume is not None:
        path, state = resume
        for name, net in nets.items():
            net.load_state_dict(state["nets"][name])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step_fn.scaler.load_state_dict(state["scaler"])
        restore_rank(state, info.rank, info.world_size, pool_a, pool_b, device)
        log.info("resumed from %s (step %d)", path, start_step)
    elif cfg.checkpoint.init_from:
        loaded = load_reference_dir(cfg.checkpoint.init_from, nets)
        log.info("initialised %s from reference weights in %s", ", ".join(loaded), cfg.checkpoint.init_from)

    if cfg.train.max_nonfinite_steps == 0:
        log.warning("train.max_nonfinite_steps=0: losses are not checked for NaN/inf, and a non-finite loss is "
                    "applied to the weights (set it to 1 or more to skip such steps and stop after that many)")
    run_id = resume[1].get("mlflow_run_id") or None if resume else None
    recorder = make_recorder(cfg, info, run_id)
    nonfinite_total = resume[1].get("nonfinite_steps", 0) if resume else 0
    del resume  # Frees the checkpoint's CPU copy of the state.

    held = {}

    def grid():
        if not held:
            held["a"] = held_out(cfg.data.test_a, cfg.train.sample_images, cfg.data.crop_size)[1].to(device)
            held["b"] = held_out(cfg.data.test_b, cfg.train.sample_images, cfg.data.crop_size)[1].to(device)
        return sample_grid(gens, held["a"], held["b"])

    def evaluate() -> dict[str, float]:
        return held_out_eval(gens.G_ab, gens.G_ba, cfg, device)

    def checkpoint(step: int, final: bool = False) -> None:
        ranks = dist.gather_to_main(rank_state(pool_a, pool_b, device))
        failure = None
        if ranks is not None:
            state = build_state(step=step, images_seen=images_seen, nets=nets, opt_g=opt_g, opt_d=opt_d,
                                scaler=step_fn.scaler, rank_states=ranks, cfg=cfg, run_id=recorder.run_id,
                                nonfinite_steps=nonfinite_total)
            failure = recorder.save_checkpoint(state, step, final=final)
        # Every rank learns whether rank 0 wrote it (this also keeps the ranks together, as a barrier would):
        # a final checkpoint that failed ends the run on all of them, not only on rank 0.
        failure = dist.broadcast_from_main(failure)
        if failure and final:
            raise CheckpointWriteError(failure if info.is_main else "rank 0 could not write the final checkpoint "
                                       "(its log says why)")

    # Train.
    total = cfg.train.steps
    global_batch = cfg.data.batch_per_rank * info.world_size
    has_samples = bool(cfg.data.test_a and cfg.data.test_b and cfg.train.sample_every_steps > 0)
    paired_eval = bool((cfg.eval.paired or cfg.eval.features) and cfg.data.test_a and cfg.data.test_b)
    meter = MetricMeter(device)
    metrics: dict[str, float] = {}
    evaluation: dict[str, float] = {}
    nonfinite_run = 0
    status = "FAILED"
    stopped_at = 0
    recorder.start(start_step, total)
    if has_samples and start_step == 0:
        recorder.save_samples(grid, 0)  # The untrained translation: the UI's slider starts here.
    batches = iter(loader)
    own_flag = stop_flag is None
    stop_flag = StopFlag().install() if stop_flag is None else stop_flag
    together = True
    try:
        for step in range(start_step + 1, total + 1):
            t_data = time.perf_counter()
            real_a, real_b = next(batches)
            real_a = normalize(real_a.to(device, non_blocking=True))
            real_b = normalize(real_b.to(device, non_blocking=True))
            data_s = time.perf_counter() - t_data

            lr = cfg.optim.lr * lr_factor(step - 1, total, cfg.optim.decay_start_frac)
            set_lr(opt_g, lr)
            set_lr(opt_d, lr)
            chunk_done = cfg.train.stop_after_steps > 0 and step - start_step >= cfg.train.stop_after_steps
            result = step_fn(real_a, real_b, stop_requested=bool(stop_flag) or chunk_done)

            # Bookkeeping.
            images_seen += global_batch
            if result.applied:
                nonfinite_run = 0
                meter.add(result.losses, data_s)
            else:
                nonfinite_run += 1
                nonfinite_total += 1
                log.warning("step %d: non-finite loss (%s); update skipped (%d in a row)", step,
                            ", ".join(f"{k}={v.item():.3g}" for k, v in result.losses.items()), nonfinite_run)
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} consecutive steps had a NaN/inf loss (last at step {step}); the last "
                        "checkpoint holds finite weights. Lower optim.lr, try train.precision=fp32, or check "
                        "the data for broken images"
                    )
            if step % cfg.train.log_every_steps == 0 or step == total:
                metrics = meter.collect()
                metrics.update({"lr": lr, "images_seen": float(images_seen), "nonfinite_steps": float(nonfinite_total),
                                "fp16_skipped_steps": step_fn.scaler_skips.item()})
                metrics["perf/images_per_s"] = metrics["perf/steps_per_s"] * global_batch
                metrics.update(peak_memory(device))
                recorder.log_metrics(metrics, step)
            if has_samples and (step % cfg.train.sample_every_steps == 0 or step == total):
                recorder.save_samples(grid, step)
            if paired_eval and ((cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == total):
                evaluation = evaluate()
                recorder.log_result("eval", evaluation, step)
            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or step == total or result.stop:
                checkpoint(step, final=step == total or result.stop)
            if result.stop and step < total:
                stopped_at = step
                log.warning("stopped after step %d (%s); checkpoint written, exiting with code %d", step,
                            "signal" if stop_flag else "train.stop_after_steps", EXIT_STOPPED)
                break
        if not stopped_at:
            # Two images: with one, torch.export (inside MLflow's log_model) warns that it specialised the
            # batch dimension to 1, a warning users cannot act on.
            example = torch.zeros(2, 3, cfg.data.crop_size, cfg.data.crop_size).numpy()
            recorder.log_generators({"G_ab": gens.G_ab, "G_ba": gens.G_ba}, example)
        status = "KILLED" if stopped_at else "FINISHED"
    except (CheckpointWriteError, NonFiniteLossError):
        raise  # Agreed by all ranks at the same step (broadcast / the step's collective): they still leave together.
    except BaseException:
        together = False
        raise
    finally:
        if own_flag:
            stop_flag.uninstall()
        recorder.finish(status)
        # Ranks leave together: under torchrun the first rank to exit gets the others SIGTERMed, which would cut
        # rank 0's final MLflow flush short.
        if together:
            dist.barrier()
    return RunResult(stopped_at or total, metrics, evaluation, recorder.run_id, stopped=bool(stopped_at))


def held_out_summary(ev: dict[str, float]) -> str:
    """The end-of-training line: G_ab's held-out L1 against returning the input, worded by direction."""
    g, idt = ev["l1_translation"], ev["l1_identity"]
    if g < idt:
        compared = f"{idt / max(g, 1e-12):.1f}x lower than identity"
    elif g > idt:
        compared = f"{g / max(idt, 1e-12):.1f}x higher than identity: worse than not translating"
    else:
        compared = "equal to identity"
    return (f"held-out A->B L1 error over {int(ev['pairs'])} pairs: G_ab {g:.4f} vs identity {idt:.4f} "
            f"({compared})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, applied in order)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=1000")
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


@record
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = dist.read_env()
    setup_logging(info.rank)
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        log.error("%s", err)
        return 2
    finally:
        dist.destroy_process_group()
    if result.stopped:
        # torchrun counts any non-zero exit as a crash (it restarts the group or reports a failure), so under
        # torchrun a clean stop exits 0; its log line says where it stopped.
        return 0 if os.environ.get("TORCHELASTIC_RUN_ID") else EXIT_STOPPED
    if "l1_translation" in result.evaluation and info.is_main:
        print(held_out_summary(result.evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
