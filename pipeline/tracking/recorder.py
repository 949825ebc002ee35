"""Every rank-0 side effect of a run behind one object: console, run directory, checkpoints, MLflow.

Ranks other than 0 get a `NullRecorder`, so the training loop calls the same methods on every rank and never
tests the rank itself. Collectives (gathering per-rank state, averaging losses) stay in the loop, on all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from pipeline.config import flatten, to_yaml
from pipeline.engine.checkpoint import Outcome
from pipeline.engine.dist import DistInfo
from pipeline.engine.progress import format_duration
from pipeline.engine.version import code_version
from pipeline.tracking.trackers import MLflowTracker, NullTracker, OfflineTracker, TrackingUnavailable

log = logging.getLogger(__name__)


def nest_results(values: dict[str, float], step: int) -> dict[str, Any]:
    """{"AtoB/fid": x, "pairs": n} -> {"step": step, "pairs": n, "results": {"AtoB": {"fid": x}}}."""
    record: dict[str, Any] = {"step": step}
    results: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        group, _, name = key.partition("/")
        if name:
            results.setdefault(group, {})[name] = value
        else:
            record[key] = value
    if results:
        record["results"] = results
    return record


class NullRecorder:
    """What ranks other than 0 record: nothing."""

    tracker: NullTracker = NullTracker()

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def start(self, start_step: int, total_steps: int) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def batch_regime(self, world_size: int, global_batch: int, lr: float) -> None: ...
    def health_warning(self, message: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def save_samples(self, make_grid: Callable[[], np.ndarray], step: int) -> None: ...
    def checkpoint_written(self, outcome: Outcome) -> str | None:
        return None

    def log_result(self, name: str, values: dict[str, float], step: int) -> None: ...
    def log_generators(self, generators: dict[str, Any], example: np.ndarray) -> None: ...
    def finish(self, status: str) -> None: ...


class Recorder(NullRecorder):
    """Rank 0's record of the run: `run_dir/{config.yaml, metrics.jsonl, samples/}`, checkpoint reports and MLflow."""

    def __init__(self, cfg: DictConfig, info: DistInfo, run_id: str | None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.info = info
        # The local record first: a tracker opened before a failure here would leave its MLflow run RUNNING.
        self._metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        try:
            self.tracker = open_tracker(cfg, run_id, self.run_dir, info.world_size)
        except BaseException:
            self._metrics_file.close()
            raise
        self._t0 = time.perf_counter()
        self._start_step = 0
        self._total = 0
        self._logged_through = -1  # Highest step already in the record (a resume sets it).

    def start(self, start_step: int, total_steps: int) -> None:
        self._start_step, self._total = start_step, total_steps
        self._t0 = time.perf_counter()
        if start_step:
            # After a crash, the steps since the last checkpoint run again and log again. Resume is exact, so
            # their values equal what was logged: skip them to keep one duplicate-free series per metric.
            self._logged_through = max(self._last_step_in_file(), self.tracker.last_step("lr"))
        if start_step == 0:
            self.tracker.log_params(flatten(self.cfg))
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.set_tags(
            {
                "git_commit": code_version(),
                "world_size": str(self.info.world_size),
                "num_nodes": str(self.info.num_nodes),
                "hostname": platform.node(),
                "torch_version": torch.__version__,
                "cuda_version": str(torch.version.cuda),
                "precision": self.cfg.train.precision,
                "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "")),
                "run_dir": str(self.run_dir.resolve()),
            }
        )
        where = f"resuming at step {start_step}" if start_step else "starting"
        log.info("%s: %d steps to go, run directory %s, MLflow run %s", where, total_steps - start_step,
                 self.run_dir, self.tracker.run_id)

    def batch_regime(self, world_size: int, global_batch: int, lr: float) -> None:
        """Say what the optimiser sees: the global batch and the learning rate in use. The paper's settings are
        for batch 1; data-parallel ranks multiply the batch, which changes the training regime unless said."""
        optim = self.cfg.optim
        how = (f"optim.lr={optim.lr:g} as given (optim.lr_scaling=none)" if optim.lr_scaling == "none" else
               f"optim.lr={optim.lr:g} scaled {optim.lr_scaling} from batch {optim.lr_reference_batch}")
        log.info("global batch %d per domain and step (%d rank(s) x data.batch_per_rank=%d); learning rate %g: %s",
                 global_batch, world_size, self.cfg.data.batch_per_rank, lr, how)
        if optim.lr_scaling == "none" and global_batch != optim.lr_reference_batch:
            log.warning("the global batch (%d) differs from the batch optim.lr is meant for "
                        "(optim.lr_reference_batch=%d): the same lr then takes fewer, larger-batch steps per "
                        "image; set optim.lr_scaling=sqrt or linear to scale it, or see README 'Distributed "
                        "training'", global_batch, optim.lr_reference_batch)
        self.tracker.set_tags({"global_batch": str(global_batch), "lr_in_use": f"{lr:g}"})

    def health_warning(self, message: str) -> None:
        """A sign that the run is not learning (pipeline.train.health), said once, and tagged on the run."""
        log.warning("%s", message)
        self.tracker.set_tags({"health_warning": message[:500]})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the run (what the sample grids show of a domain that is not 8-bit RGB, ...)."""
        self.tracker.set_tags(tags)

    def _last_step_in_file(self) -> int:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._logged_through:
            return
        self._metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics_file.flush()
        self.tracker.log_metrics(metrics, step)
        elapsed = time.perf_counter() - self._t0
        done = step - self._start_step
        eta = elapsed / max(done, 1) * (self._total - step)
        losses = " ".join(f"{k.removeprefix('loss/')}={v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))
        self._warn_if_data_bound(metrics.get("perf/data_wait_share", 0.0))
        # images_per_s counts images of each domain (A-B pairs), as images_seen and data.batch_per_rank do.
        log.info("step %d/%d | %.1f img/s per domain, %.2f steps/s | ETA %s | %s", step, self._total,
                 metrics.get("perf/images_per_s", 0.0), metrics.get("perf/steps_per_s", 0.0),
                 format_duration(eta), losses)

    def _warn_if_data_bound(self, share: float) -> None:
        """Steps that wait for data waste accelerators: say so, with the worker count that would feed them.

        With k workers each needing L seconds per batch and a step computing for C seconds, the wait share is
        w = 1 - C / (L / k); no wait needs k' = ceil(k / (1 - w)) workers (k = 0 decodes in the step itself).
        """
        if share <= self.cfg.report.data_wait_warn_share or share >= 1.0:
            return
        workers = self.cfg.data.workers
        needed = math.ceil(workers / (1 - share)) if workers else max(1, math.ceil(share / (1 - share)))
        log.warning("data-bound: %.0f%% of step time waits for data with data.workers=%d; data.workers=%d "
                    "would feed the step (or shard with --resize to decode less)", 100 * share, workers, needed)

    def save_samples(self, make_grid: Callable[[], np.ndarray], step: int) -> None:
        """Render the grid (only rank 0 spends the forward passes) and record it."""
        grid = make_grid()
        path = self.run_dir / "samples" / f"step-{step:09d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(grid).save(path)
        if step > self._logged_through:
            self.tracker.log_image(grid, key="samples", step=step)

    def checkpoint_written(self, outcome: Outcome) -> str | None:
        """Record a write that ended: log it and upload it as configured; returns the message that ends the run
        when it was a final checkpoint that failed, else None.

        A failed checkpoint before the last one is logged and training goes on (the next one tries again); a
        failed best.pt keeps the previous one.
        """
        if outcome.kind == "best":
            self._best_written(outcome)
            return None
        if outcome.error:
            if outcome.final:
                return (f"{outcome.error}. This was the run's last checkpoint (step {outcome.step}): make room, "
                        "then run the same command again; checkpoint.resume=auto continues from the newest "
                        "checkpoint")
            log.error("%s. Training continues and tries again at the next checkpoint", outcome.error)
            return None
        log.info("checkpoint %s (training waited %.0f ms; durable %.1f s after the step)", outcome.path,
                 1000 * outcome.blocked_s, outcome.durable_s)
        logged = self.cfg.tracking.log_checkpoints
        if logged == "all" or (outcome.final and logged == "last"):
            self._upload(outcome, "checkpoints")
        _discard(outcome.packed)
        return None

    def _upload(self, outcome: Outcome, artifact_path: str) -> None:
        if self.cfg.tracking.checkpoint_content == "full":
            self.tracker.log_artifacts(outcome.path, f"{artifact_path}/{outcome.path.name}")
        elif outcome.packed is not None:
            self.tracker.log_artifact(outcome.packed, artifact_path)  # The tracker keeps its own link to the file.

    def _best_written(self, outcome: Outcome) -> None:
        """best.pt: MLflow metric `best/<metric>` at its step and the file as the `best` artifact."""
        if outcome.error:
            log.error("%s; the previous best.pt (if any) is kept", outcome.error)
            return
        metric, value = outcome.info["metric"], outcome.info["value"]
        log.info("best so far: %s = %.6g at step %d (%s)", metric, value, outcome.step, outcome.path)
        self.tracker.log_metrics({f"best/{metric}": value}, outcome.step)
        if self.cfg.tracking.log_checkpoints != "none":
            self.tracker.log_artifact(outcome.path, "best")

    def log_result(self, name: str, values: dict[str, float], step: int) -> None:
        """`run_dir/<name>.json` and MLflow `<name>/<key>` metrics at `step`.

        The file nests `AtoB/fid`-style keys as `pipeline.evaluate --json` does (`{"step": ..., "results":
        {"AtoB": {"fid": ...}}}`; keys without a direction stay at the top), so both read the same way.
        """
        (self.run_dir / f"{name}.json").write_text(json.dumps(nest_results(values, step), indent=2) + "\n")
        self.tracker.log_metrics({f"{name}/{k}": v for k, v in values.items()}, step)

    def log_generators(self, generators: dict[str, Any], example: np.ndarray) -> None:
        if self.cfg.tracking.log_model:
            self.tracker.log_generators(generators, example)

    def finish(self, status: str) -> None:
        self._metrics_file.close()
        if self.tracker.dropped:
            log.warning("MLflow: %d records were dropped during this run (see warnings above)", self.tracker.dropped)
        self.tracker.finish(status)


class TrackingError(RuntimeError):
    """The tracking store could not be opened and tracking.required=true: the run stops before training."""


def open_tracker(cfg: DictConfig, run_id: str | None, run_dir: Path, world_size: int = 1) -> NullTracker:
    """MLflow as configured. A store that cannot be opened never decides alone whether training starts:
    tracking.required does, and without it the run trains with its record kept in run_dir."""
    if not cfg.tracking.enabled:
        return NullTracker()
    name = cfg.tracking.run_name or run_dir.name
    timeout_s = cfg.tracking.start_timeout_s
    if world_size > 1 and timeout_s > cfg.dist.timeout_s / 3:
        # The other ranks wait for rank 0 in a collective meanwhile: stay well inside its timeout.
        timeout_s = cfg.dist.timeout_s / 3
        log.warning("tracking.start_timeout_s=%g is cut to %g s, a third of dist.timeout_s, which the other ranks "
                    "wait for rank 0 at most", cfg.tracking.start_timeout_s, timeout_s)
    try:
        return MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, name, run_id,
                             flush_timeout_s=cfg.tracking.flush_timeout_s, start_timeout_s=timeout_s)
    except TrackingUnavailable as err:
        if cfg.tracking.required:
            raise TrackingError(f"{err}. tracking.required=true, so the run stops: start the store (or fix "
                                "tracking.uri) and run again, or set tracking.required=false to train without "
                                "it") from None
        continued = f" --run-id {run_id}" if run_id else ""
        log.warning("%s. Training goes on without MLflow (tracking.required=false): this run's metrics, sample "
                    "grids and checkpoints are kept in %s (metrics.jsonl, samples/, ckpt-*); its MLflow run will "
                    "lack them until you upload them with `python -m pipeline.sync %s%s` once the store is back",
                    err, run_dir, run_dir, continued)
        # Keeps the run id a resumed run had, so its checkpoints still name it and the next start continues it.
        return OfflineTracker(run_id)


def _discard(packed: Path | None) -> None:
    """Delete an uploaded (or unwanted) generators file and its folder once empty."""
    if packed is not None:
        packed.unlink(missing_ok=True)
        try:
            packed.parent.rmdir()
        except OSError:
            pass


def make_recorder(cfg: DictConfig, info: DistInfo, run_id: str | None) -> NullRecorder:
    return Recorder(cfg, info, run_id) if info.is_main else NullRecorder()
