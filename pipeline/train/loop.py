"""The CycleGAN training loop: fetch an unpaired batch, set the learning rate, run the step, then let each
periodic job decide by its own interval (metrics, samples, evaluation, checkpoint).

`run()` sets up one rank (process group, resume, data, components, recorder); `Trainer.train()` is the loop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig

from pipeline.config import ConfigError
from pipeline.data.held_out import held_out
from pipeline.data.images import normalize
from pipeline.data.pixels import formats_from
from pipeline.data.stream import DataError, check_enough_samples, expand_pattern, train_loader
from pipeline.data.stream_state import saved_streams, stream_identity, stream_start
from pipeline.engine import dist
from pipeline.engine.checkpoint import (
    BEST_NAME,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    Outcome,
    find_latest_loadable,
    is_checkpoint_directory,
    load_checkpoint,
    read_best,
)
from pipeline.engine.meter import MetricMeter, peak_memory
from pipeline.engine.nonfinite import NonFiniteGuard, NonFiniteLossError
from pipeline.engine.optim import lr_factor, scaled_lr, set_lr
from pipeline.engine.run_lock import RunDirError, RunLock, acquire
from pipeline.engine.schedule import Every
from pipeline.engine.stop import EXIT_STOPPED, StopFlag
from pipeline.eval.evaluate import held_out_eval
from pipeline.eval.metrics.features import how_to_provide
from pipeline.infer.generators import generators_file
from pipeline.infer.interop import load_reference_dir
from pipeline.tracking.recorder import NullRecorder, TrackingError, make_recorder
from pipeline.train.build import Components, build_components
from pipeline.train.colour_start import domain_moments
from pipeline.train.health import TrainingHealth, input_dependence
from pipeline.train.samples import sample_grid
from pipeline.train.state import TrainingState, check_compatible

log = logging.getLogger("pipeline.train")

T = TypeVar("T")


__all__ = ["NonFiniteLossError", "RunResult", "Trainer", "run"]


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    evaluation: dict[str, float]
    run_id: str | None
    stopped: bool = False
    """A signal stopped the run after `step` (checkpointed); resuming continues it."""


def _find_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from. Rank 0 chooses and every rank takes its choice: on a slow network filesystem
    two ranks listing the run directory could see different newest checkpoints."""
    if cfg.checkpoint.resume == "never":
        return None
    chosen = None
    if dist.is_main_process():
        if cfg.checkpoint.resume == "auto":
            found = find_latest_loadable(cfg.run_dir)
            chosen = str(found[0]) if found else None
        else:
            chosen = cfg.checkpoint.resume
    return dist.broadcast_from_main(chosen)


def _read_resume(path: str, cfg: DictConfig, rank: int) -> dict[str, Any]:
    """This rank's part of the checkpoint (the replicated state and its own entry: what a rank reads does not grow
    with the world size), checked against the config. A rank that cannot read it fails every rank with its
    reason, instead of leaving the others waiting in the next collective."""
    state, problem = {}, None
    try:
        state = load_checkpoint(path, ranks=rank)
        if state.get("kind") == "generators":
            raise CheckpointError(f"'{path}' is a generators file (for translation and sharing): it has no "
                                  "discriminators, optimisers or pools to resume from; resume from a ckpt-* "
                                  "checkpoint")
        check_compatible(state, cfg, path)
    except CheckpointError as err:
        problem = str(err) if rank == 0 else f"rank {rank}: {err}"
    problems = [p for p in dist.gather_objects(problem) if p]
    if problems:
        raise CheckpointError(problems[0])
    return state


def run(cfg: DictConfig, stop_flag: StopFlag | None = None) -> RunResult:
    """Train as configured on this process's rank; returns the last logged metrics and evaluation.

    Args:
        cfg: the run's config (`load_config`).
        stop_flag: an installed StopFlag owned by the caller (a launcher that must not lose a stop signal that
            arrives while the run starts); by default the loop installs its own.
    """
    info = dist.read_env()
    device = dist.select_device(cfg.train.device, info)
    dist.init_process_group(info, device, cfg.dist.timeout_s, socket_ifname=cfg.dist.socket_ifname)
    random.seed(cfg.train.seed * 1000 + info.rank)
    urls = _inputs_from_main(cfg, info)  # Read-only: a typo leaves no run directory behind.
    lock = _own_run_dir(cfg, info)
    try:
        return _run(cfg, info, device, stop_flag, urls)
    finally:
        if lock is not None:
            lock.release()


# The errors rank 0 can meet while it sets the run up alone, by name: every rank raises the one rank 0 met.
_SET_UP_ERRORS: dict[str, type[Exception]] = {
    "RunDirError": RunDirError, "TrackingError": TrackingError, "DataError": DataError, "ConfigError": ConfigError,
}


def _main_decides(what: str, work: Callable[[], T], is_main: bool) -> T | None:
    """`work()` on rank 0 (None elsewhere), and how it ended on every rank: an error rank 0 meets is raised on
    every rank (an OSError as a RunDirError saying `what` failed; a bug as itself on rank 0 and a RuntimeError
    elsewhere), so no rank waits for rank 0 in a collective that never comes."""
    result, problem, unexpected = None, None, None
    if is_main:
        try:
            result = work()
        except tuple(_SET_UP_ERRORS.values()) as err:
            problem = (type(err).__name__, str(err))
        except OSError as err:
            problem = ("RunDirError", f"{what}: {err}")
        except Exception as err:  # A bug: reported as itself on rank 0, in a line elsewhere.
            problem, unexpected = ("RuntimeError", f"rank 0 failed ({what}): {err!r}"), err
    try:
        problem = dist.broadcast_from_main(problem)
    except BaseException:
        if isinstance(result, RunLock):
            result.release()  # Taken, but the job cannot go on.
        raise
    if unexpected is not None:
        raise unexpected
    if problem:
        raise _SET_UP_ERRORS.get(problem[0], RuntimeError)(problem[1])
    return result


def _own_run_dir(cfg: DictConfig, info: dist.DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock for the whole job before anything is written."""
    return _main_decides(f"cannot take the lock of run_dir '{cfg.run_dir}'",
                         lambda: acquire(cfg.run_dir, cfg.control.lock_stale_s, info.world_size), info.is_main)


def _start_recorder(cfg: DictConfig, info: dist.DistInfo, run_id: str | None) -> NullRecorder:
    """The run's recorder: rank 0's writes the record, the other ranks' do nothing."""
    recorder = _main_decides(f"cannot write the run's record in run_dir '{cfg.run_dir}'",
                             lambda: make_recorder(cfg, info, run_id), info.is_main)
    return recorder if recorder is not None else NullRecorder()


def _inputs_from_main(cfg: DictConfig, info: dist.DistInfo) -> dict[str, list[str]]:
    """Rank 0 checks the inputs and expands the training shard patterns; every rank takes its lists. One glob
    and one stat per shard for the job, not per rank: 10k shards on 512 ranks would be 5M metadata calls on a
    shared filesystem at every start."""
    urls = _main_decides("cannot check the inputs", lambda: check_inputs(cfg), info.is_main)
    return dist.broadcast_from_main(urls)


def check_inputs(cfg: DictConfig) -> dict[str, list[str]]:
    """The files the run reads, checked before anything is written: the training shards, and what is read only
    later (held-out sets at the first sample grid, the feature extractor at the first evaluation), so that a typo
    costs neither a run directory nor the steps before it.

    Returns:
        The shard URLs of each training domain ("A", "B").

    Raises:
        DataError: a shard or held-out pattern that names nothing.
        ConfigError: a feature extractor file that does not exist.
    """
    urls = {}
    for domain in ("A", "B"):
        pattern = cfg.data[f"train_{domain.lower()}"]
        urls[domain] = expand_pattern(pattern, f"data.train_{domain.lower()}")
        check_enough_samples(pattern, urls[domain], cfg.data.batch_per_rank, domain)
    for key in ("test_a", "test_b"):
        source = cfg.data[key]
        if source and not Path(source).exists():
            expand_pattern(source, f"data.{key}")
    if cfg.eval.features and not Path(cfg.eval.features).is_file():
        raise ConfigError(f"eval.features='{cfg.eval.features}' is not a file. {how_to_provide()}")
    return urls


def _run(cfg: DictConfig, info: dist.DistInfo, device: torch.device, stop_flag: StopFlag | None,
         urls: dict[str, list[str]]) -> RunResult:
    # Resume (before anything is written, so a bad checkpoint loses nothing).
    resume = _find_resume(cfg)
    saved = _read_resume(resume, cfg, info.rank) if resume is not None else None
    start_step = saved["step"] if saved else 0

    # Data first: the failure to find shards surfaces before the networks are built.
    identity = stream_identity(cfg.data, urls, info.world_size)
    start = stream_start(saved, info.rank, identity)
    loader = train_loader(cfg.data, cfg.train.seed, info.rank, start_batch=start.start_batch,
                          pin_memory=device.type == "cuda", urls=urls, state=start.state,
                          fresh_from=start.fresh_from, formats=formats_from(cfg))
    fresh = saved is None and not cfg.checkpoint.init_from  # Else the networks come from a checkpoint.
    moments = domain_moments(cfg, urls) if fresh and cfg.model.colour_start == "transfer" else None
    parts = build_components(cfg, info, device, moments)
    state = TrainingState(parts.nets, parts.step.optimisers, parts.step.pools, device, parts.ema,
                          getattr(parts.step, "sampling", None), streams=lambda: saved_streams(loader, identity),
                          health=TrainingHealth(cfg.report.health_after_steps, cfg.loss.gan_mode,
                                                (cfg.loss.lambda_a + cfg.loss.lambda_b) / 2, cfg.cut.lambda_nce,
                                                math.log(cfg.cut.num_patches + 1)))
    if saved is not None:
        state.load_state_dict(saved, info.rank, info.world_size)
        log.info("resumed from %s (step %d)", resume, start_step)
    elif cfg.checkpoint.init_from:
        _initialise(cfg, parts.nets)
    guard = NonFiniteGuard(cfg.control.max_nonfinite_steps)
    recorder = _start_recorder(cfg, info, (saved.get("mlflow_run_id") or None) if saved else None)
    formats = formats_from(cfg)
    if not all(fmt.is_8bit_rgb for fmt in formats.values()):
        recorder.set_tags({"samples_display": "; ".join(f"{d}: {f.describe_display()}" for d, f in formats.items())})
    del saved  # Frees this rank's copy of the checkpoint.
    checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps,
                                cfg.checkpoint.min_free_mb, is_main=info.is_main, timeout_s=cfg.dist.timeout_s)
    return Trainer(cfg, info, device, parts, state, guard, recorder, checkpointer).train(loader, stop_flag)


def _initialise(cfg: DictConfig, nets: dict[str, torch.nn.Module]) -> None:
    """checkpoint.init_from: the networks' weights from one of our checkpoints (a directory, a ckpt-*.pt file of an
    earlier version, a generators file: the networks it has) or a reference folder; optimisers start fresh."""
    source = Path(cfg.checkpoint.init_from)
    if is_checkpoint_directory(source) or source.is_file():
        state = load_checkpoint(source, ranks=None)
        check_compatible(state, cfg, str(source))
        loaded = [name for name in nets if name in state["nets"]]
        for name in loaded:
            nets[name].load_state_dict(state["nets"][name])
        log.info("initialised %s from checkpoint %s (step %s)", ", ".join(loaded), source, state.get("step"))
        return
    loaded = load_reference_dir(source, nets)
    log.info("initialised %s from reference weights in %s", ", ".join(loaded), source)


class Trainer:
    """One rank's training from `state.step` to `train.steps`; rank-0 side effects go through `recorder`."""

    def __init__(self, cfg: DictConfig, info: dist.DistInfo, device: torch.device, parts: Components,
                 state: TrainingState, guard: NonFiniteGuard, recorder: Any, checkpointer: Checkpointer) -> None:
        self.cfg, self.info, self.device = cfg, info, device
        self.parts, self.state, self.guard, self.recorder = parts, state, guard, recorder
        self.checkpointer = checkpointer
        self.total = cfg.train.steps
        self.start_step = state.step
        self.images_per_step = cfg.data.batch_per_rank * info.world_size
        self.base_lr = scaled_lr(cfg.optim.lr, self.images_per_step, cfg.optim.lr_scaling,
                                 cfg.optim.lr_reference_batch)
        self.meter = MetricMeter(device)
        self.health = state.health
        self.metrics: dict[str, float] = {}
        self.evaluation: dict[str, float] = {}
        self._held: dict[str, torch.Tensor] = {}
        held_out_sets = bool(cfg.data.test_a and cfg.data.test_b)
        self.should_log = Every(cfg.report.log_every_steps, self.total)
        self.should_sample = Every(cfg.report.sample_every_steps, self.total,
                                   enabled=held_out_sets and cfg.report.sample_every_steps > 0)
        self.should_evaluate = Every(cfg.eval.every_steps, self.total,
                                     enabled=held_out_sets and bool(cfg.eval.paired or cfg.eval.features))
        self.should_save = Every(cfg.checkpoint.every_steps, self.total)
        # The best evaluation so far (checkpoint.best_metric), as best.pt in run_dir records it; decided on rank 0.
        self.best_key = cfg.checkpoint.best_metric.removeprefix("eval/")
        best = read_best(cfg.run_dir) if self.best_key and info.is_main else None
        same = best is not None and best.get("metric") == cfg.checkpoint.best_metric \
            and best.get("mode") == cfg.checkpoint.best_mode
        self.best_value: float | None = float(best["value"]) if same else None

    def train(self, loader: Any, stop_flag: StopFlag | None = None) -> RunResult:
        """The loop: batch, schedule, step, then each periodic job on its own interval."""
        status, stopped_at, together = "FAILED", 0, True
        self.recorder.start(self.start_step, self.total)
        self.recorder.batch_regime(self.info.world_size, self.images_per_step, self.base_lr)
        if self.should_sample.enabled and self.start_step == 0:
            self.recorder.save_samples(self.sample_grid, 0)  # The untrained translation: the UI's slider starts here.
        batches = iter(loader)
        own_flag = stop_flag is None
        stop_flag = StopFlag().install() if stop_flag is None else stop_flag
        try:
            for step in range(self.start_step + 1, self.total + 1):
                real_a, real_b, data_s = self.next_batch(batches)
                lr = self.set_lr(step)
                result = self.parts.step(real_a, real_b, stop_requested=bool(stop_flag) or self.chunk_done(step))
                self.report_checkpoints()  # Background writes that ended during the step.
                if result.applied and self.parts.ema is not None:
                    self.parts.ema.update(step)
                self.account(step, result, data_s)
                if self.should_log(step):
                    self.log_metrics(step, lr)
                if self.should_sample(step):
                    self.recorder.save_samples(self.sample_grid, step)
                if self.should_evaluate(step):
                    self.evaluate(step)
                if self.should_save(step) or result.stop:
                    self.save(step, final=step == self.total or result.stop)
                if result.stop and step < self.total:
                    stopped_at = step
                    log.warning("stopped after step %d (%s); checkpoint written, exiting with code %d", step,
                                "signal" if stop_flag else "control.stop_after_steps", EXIT_STOPPED)
                    break
            if not stopped_at:
                self.log_generators()
            status = "KILLED" if stopped_at else "FINISHED"
        except (CheckpointWriteError, NonFiniteLossError):
            raise  # Agreed by all ranks at the same step (broadcast / the step's collective): they leave together.
        except BaseException as err:
            together = False
            self.report_lost_peer(err)
            raise
        finally:
            if own_flag:
                stop_flag.uninstall()
            # A write in flight ends before the process does; after a lost peer it is abandoned (its collectives
            # could only time out), leaving the previous checkpoint the newest complete one.
            self.report_checkpoints(self.checkpointer.close(wait=together))
            self.recorder.finish(status)
            # Ranks leave together: under torchrun the first rank to exit gets the others SIGTERMed, which would
            # cut rank 0's final MLflow flush short.
            if together:
                dist.barrier()
        return RunResult(stopped_at or self.total, self.metrics, self.evaluation, self.recorder.run_id,
                         stopped=bool(stopped_at))

    def report_lost_peer(self, err: BaseException) -> None:
        """A collective that failed: one error line naming the rank and host that went away (or, where the
        error says no more than that it timed out, every rank's host), and how to continue."""
        if not dist.is_distributed() or not isinstance(err, RuntimeError):
            return
        lost = dist.describe_lost_peer(err, self.info.rank)
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        silent = None if lost else dist.unreachable_peers(self.info.rank)
        if lost:
            what = f"lost contact with {lost}"
        elif silent:
            what = (f"no answer within dist.timeout_s={self.cfg.dist.timeout_s:.0f} s; unreachable: {silent}")
        else:
            ranks = ", ".join(f"{r} on {h}" for r, (h, _) in enumerate(dist.hosts()))
            what = (f"a collective failed or got no answer within dist.timeout_s={self.cfg.dist.timeout_s:.0f} s "
                    f"(ranks: {ranks})")
        log.error("rank %d: %s (%s); this rank stops. Once the hosts are back, the same command resumes from the "
                  "last checkpoint.", self.info.rank, what, first)

    # The loop's parts, in the order a step uses them.

    def next_batch(self, batches: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        t_data = time.perf_counter()
        real_a, real_b = next(batches)
        real_a = normalize(real_a.to(self.device, non_blocking=True))
        real_b = normalize(real_b.to(self.device, non_blocking=True))
        return real_a, real_b, time.perf_counter() - t_data

    def set_lr(self, step: int) -> float:
        lr = self.base_lr * lr_factor(step - 1, self.total, self.cfg.optim.decay_start_frac)
        set_lr(self.state.optimisers.g, lr)
        set_lr(self.state.optimisers.d, lr)
        return lr

    def chunk_done(self, step: int) -> bool:
        """control.stop_after_steps: this process has run its share of a chained job."""
        chunk = self.cfg.control.stop_after_steps
        return chunk > 0 and step - self.start_step >= chunk

    def account(self, step: int, result: Any, data_s: float) -> None:
        self.state.step = step
        self.state.images_seen += self.images_per_step
        if not result.applied:
            self.state.nonfinite_steps += 1
        self.guard.record(step, result.applied, result.losses)
        if result.applied:
            self.meter.add(result.losses, data_s)

    def log_metrics(self, step: int, lr: float) -> None:
        metrics = self.meter.collect()
        metrics.update({"lr": lr, "images_seen": float(self.state.images_seen),
                        "nonfinite_steps": float(self.state.nonfinite_steps),
                        "fp16_skipped_steps": float(self.parts.step.scaler_skips)})
        metrics["perf/images_per_s"] = metrics["perf/steps_per_s"] * self.images_per_step
        metrics.update(peak_memory(self.device))
        signals, warnings = self.health.observe(step, metrics)
        metrics.update(signals)
        for warning in warnings:
            self.recorder.health_warning(warning)
        self.metrics = metrics
        self.recorder.log_metrics(metrics, step)

    def sample_grid(self) -> Any:
        formats = formats_from(self.cfg)
        if not self._held:
            size, count = self.cfg.data.crop_size, self.cfg.report.sample_images
            self._held["a"] = held_out(self.cfg.data.test_a, count, size, formats["A"])[1].to(self.device)
            self._held["b"] = held_out(self.cfg.data.test_b, count, size, formats["B"])[1].to(self.device)
        def seen(real_a: torch.Tensor, fake_b: torch.Tensor) -> None:
            self.health.dependence = input_dependence(real_a, fake_b)

        return sample_grid(self.parts.translators(), self._held["a"], self._held["b"], seen,
                           (formats["A"].bands, formats["B"].bands))

    def evaluate(self, step: int) -> None:
        self.evaluation = held_out_eval(self.parts.translators(), self.cfg, self.device)
        self.recorder.log_result("eval", self.evaluation, step)
        if self.best_key:
            self.keep_if_best(step)

    def keep_if_best(self, step: int) -> None:
        """Rank 0 judges the evaluation against the best so far; all ranks then gather the state if it won."""
        verdict: Any = None
        if self.info.is_main:
            value = self.evaluation.get(self.best_key)
            if value is None:
                verdict = ("missing", sorted(self.evaluation))
            else:
                better = self.best_value is None or (value < self.best_value if self.cfg.checkpoint.best_mode == "min"
                                                     else value > self.best_value)
                verdict = ("better", float(value)) if better else ("worse", float(value))
        kind, detail = dist.broadcast_from_main(verdict)
        if kind == "missing":
            raise ConfigError(f"checkpoint.best_metric={self.cfg.checkpoint.best_metric} is not among the "
                              f"evaluation's metrics: {', '.join('eval/' + k for k in detail)}")
        if kind != "better":
            return
        # Rank 0 holds the replicated state: it writes the generators file alone, in the background.
        record = {"metric": self.cfg.checkpoint.best_metric, "mode": self.cfg.checkpoint.best_mode,
                  "value": detail, "step": step}
        self.checkpointer.write_main("best", Path(self.cfg.run_dir) / BEST_NAME,
                                     lambda: {**generators_file({**self.header(), **self.state.shared_state()}),
                                              "best": record}, step, record)
        self.best_value = detail

    def header(self) -> dict[str, Any]:
        return self.state.header(self.cfg, self.recorder.run_id, self.info.world_size)

    def save(self, step: int, final: bool) -> None:
        """Checkpoint `step`: each rank stages its state and writes its part in the background; a final one (the
        last step, a stop) is waited for, and its failure ends the run on every rank."""
        logged = self.cfg.tracking.log_checkpoints
        upload = self.cfg.tracking.enabled and (logged == "all" or (final and logged == "last"))
        pack = generators_file if upload and self.cfg.tracking.checkpoint_content == "generators" else None
        self.checkpointer.save(step, self.header(), self.state.shared_state(buffers=self.info.is_main),
                               self.state.rank_state(), final=final, pack=pack)
        failure = self.report_checkpoints()
        if failure and final:
            raise CheckpointWriteError(failure)

    def report_checkpoints(self, outcomes: list[Outcome] | None = None) -> str | None:
        """Hand the writes that ended to the recorder; returns the error of a failed final write, if any."""
        failure = None
        for outcome in self.checkpointer.poll() if outcomes is None else outcomes:
            failure = self.recorder.checkpoint_written(outcome) or failure
            if outcome.final and outcome.error:
                failure = failure or "the final checkpoint was not written (rank 0's log says why)"
        return failure

    def log_generators(self) -> None:
        # Two images: with one, torch.export (inside MLflow's log_model) warns that it specialised the batch
        # dimension to 1, a warning users cannot act on.
        example = torch.zeros(2, 3, self.cfg.data.crop_size, self.cfg.data.crop_size).numpy()
        gens = self.parts.eval_gens
        self.recorder.log_generators({name: getattr(gens, name) for name in self.parts.directions.values()}, example)
