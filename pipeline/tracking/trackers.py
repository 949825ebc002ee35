"""Experiment tracking: MLflow on rank 0, a no-op tracker elsewhere.

Tracking is never the reason training dies or waits. Records go into a queue that a background thread sends
in order; while the server is unreachable they stay queued and are retried with backoff, and at the end the
run waits up to `tracking.flush_timeout_s` for them to arrive. What could not be delivered is counted and
reported as dropped. A request the server rejects (a 4xx answer) is dropped at once, with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(configured: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the local sqlite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI


class NullTracker:
    """Stands in for MLflow on ranks other than 0 and when tracking is off."""

    run_id: str | None = None
    dropped = 0

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, directory: Path, artifact_path: str) -> None: ...
    def log_generators(self, generators: dict[str, Any], example: np.ndarray) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def last_step(self, key: str) -> int:
        """The highest step at which `key` was logged in this run (0 if never)."""
        return 0


class TrackingUnavailable(RuntimeError):
    """The MLflow store could not be opened at start-up."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _never_works(err: BaseException) -> bool:
    """A URI no retry can fix: an unknown scheme, or a malformed address."""
    if isinstance(err, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
        return True  # The SQLite file's folder cannot be created or opened: waiting does not change that.
    text = str(err)
    known = ("registered tracking store", "unsupported URI", "Unsupported URI", "Invalid URL",
             "No connection adapters")
    return any(phrase in text for phrase in known) or "not a valid" in text.lower()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def first_use_lock(uri: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Serialise opening a SQLite store among this host's processes: MLflow creates and migrates a new store's
    schema on first use, and two processes doing it at once both fail (alembic's "Online migration expected to
    match one row"). An flock on a file beside the database: SQLite stores are local files (SQLite itself is
    not safe on NFS), so the lock is too."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been opening {path} for over {timeout_s:g} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class OfflineTracker(NullTracker):
    """Stands in for a store that could not be opened: records nothing, keeps the run id it was to continue."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id


def _rejected(err: Exception) -> bool:
    """A request the server understood and refused: sending it again cannot help."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and "RESOURCE_DOES_NOT_EXIST" not in str(err)


class MLflowTracker(NullTracker):
    """An MLflow run: created, or continued when `run_id` names an earlier one (a resume)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 flush_timeout_s: float = 120.0, max_queued: int = 100_000, start_timeout_s: float = 60.0) -> None:
        # The client's own retries block for minutes; the queue below retries without blocking training.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow  # Imported here: 1.4 s and 170 MB that other ranks do not need.

        self._mlflow = mlflow
        self.uri = resolve_uri(uri)
        self.run_id = self._open_run(experiment, run_name, run_id, start_timeout_s)
        self.flush_timeout_s = flush_timeout_s
        self.max_queued = max_queued
        self.dropped = 0
        self._queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._outage_since: float | None = None
        self._staging = Path(tempfile.mkdtemp(prefix="mlflow-upload-"))
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def _open_run(self, experiment: str, run_name: str, run_id: str | None, timeout_s: float) -> str:
        """Create or reopen the run, retrying for up to `timeout_s`: without a run id nothing can be recorded.

        Raises:
            TrackingUnavailable: the store could not be opened in that time, or never can be (a bad URI).
        """
        deadline, attempt = time.monotonic() + timeout_s, 0
        while True:
            try:
                with first_use_lock(self.uri, max(0.0, deadline - time.monotonic())):
                    self.client = self._mlflow.MlflowClient(self.uri)
                    return self._create_or_continue(experiment, run_name, run_id)
            except Exception as err:  # noqa: BLE001 - any failure: retry, then give up saying why
                reason = _first_line(err)
                if _never_works(err):
                    raise TrackingUnavailable(f"MLflow tracking URI '{self.uri}' cannot be used: {reason}") from None
                attempt += 1
                delay = min(2.0 * attempt, 10.0)
                if time.monotonic() + delay > deadline:
                    raise TrackingUnavailable(
                        f"MLflow at '{self.uri}' could not be opened within {timeout_s:g} s "
                        f"(tracking.start_timeout_s): {reason}") from None
                log.warning("MLflow at %s not reachable (%s); retrying in %.0f s", self.uri, reason, delay)
                time.sleep(delay)

    def _create_or_continue(self, experiment: str, run_name: str, run_id: str | None) -> str:
        if run_id:
            try:
                status = self.client.get_run(run_id).info.status
            except Exception as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                    raise
                log.warning("MLflow run %s of the checkpoint does not exist at %s (deleted, or tracking.uri "
                            "changed): this run continues in a new MLflow run", run_id, self.uri)
                run_id = None
            else:
                if status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                log.info("continuing MLflow run %s at %s", run_id, self.uri)
                return run_id
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        new_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        log.info("MLflow run %s in experiment '%s' at %s", new_id, experiment, self.uri)
        return new_id

    # Sending.

    def _submit(self, what: str, send: Callable[[], Any]) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queued:
                self._queue.popleft()
                self.dropped += 1
                log.warning("MLflow: queue full (%d records); dropped the oldest", self.max_queued)
            self._queue.append((what, send))
            self._cond.notify()

    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                what, send = self._queue[0]
            try:
                send()
            except Exception as err:  # noqa: BLE001 - classified below
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                if _rejected(err):
                    with self._cond:
                        self._queue.popleft()
                        self.dropped += 1
                    log.warning("MLflow: dropped %s, rejected by the server (%s)", what, reason)
                    continue
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("MLflow unreachable (%s); buffering records and retrying", reason)
                with self._cond:
                    if self._closing and time.monotonic() > self._deadline:
                        return
                    self._cond.wait(timeout=backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            with self._cond:
                self._queue.popleft()
            if self._outage_since is not None:
                log.warning("MLflow reachable again after %.0f s; sending buffered records",
                            time.monotonic() - self._outage_since)
                self._outage_since = None
            backoff = 1.0

    # Records.

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch.
            chunk = items[i : i + 100]
            self._submit("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit(f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        image = image.copy()
        self._submit(f"image '{key}' of step {step}",
                     lambda: self.client.log_image(self.run_id, image, key=key, step=step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file; a hard link (or copy) keeps it even if retention deletes the original first."""
        # A folder of its own per upload: names counted from the folder's contents collided once uploads ended.
        staged = Path(tempfile.mkdtemp(dir=self._staging)) / Path(path).name
        try:
            os.link(path, staged)
        except OSError:
            shutil.copy2(path, staged)

        def send() -> None:
            self.client.log_artifact(self.run_id, str(staged), artifact_path)
            shutil.rmtree(staged.parent, ignore_errors=True)

        self._submit(f"artifact {Path(path).name}", send)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        """Upload a folder's files; hard links (or copies) keep them even if retention deletes the folder first."""
        staged = Path(tempfile.mkdtemp(dir=self._staging)) / Path(directory).name
        staged.mkdir()
        for item in Path(directory).iterdir():
            if item.is_file():
                try:
                    os.link(item, staged / item.name)
                except OSError:
                    shutil.copy2(item, staged / item.name)

        def send() -> None:
            self.client.log_artifacts(self.run_id, str(staged), artifact_path)
            shutil.rmtree(staged.parent, ignore_errors=True)

        self._submit(f"artifacts {Path(directory).name}", send)

    def log_generators(self, generators: dict[str, Any], example: np.ndarray) -> None:
        """Log each generator as an MLflow PyTorch model with a signature and an input example."""
        import copy

        nets = {name: copy.deepcopy(net).cpu().eval() for name, net in generators.items()}

        def send(name: str, net: Any) -> None:
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            with torch.no_grad():
                output = net(torch.from_numpy(example)).numpy()
            pip = [f"torch=={torch.__version__.split('+')[0]}"]
            self._mlflow.set_tracking_uri(self.uri)
            with self._mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(net, name=name, signature=infer_signature(example, output),
                                         input_example=example, pip_requirements=pip)

        for name, net in nets.items():
            self._submit(f"model {name}", lambda name=name, net=net: send(name, net))

    def last_step(self, key: str) -> int:
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not read the history of %s (%s); steps may repeat", key, err)
            return 0

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run, then wait up to flush_timeout_s for everything queued to arrive."""
        self._submit(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status))
        with self._cond:
            self._deadline = time.monotonic() + self.flush_timeout_s
            self._closing = True
            self._cond.notify_all()
            pending = len(self._queue)
        if pending > 1:
            log.info("MLflow: sending %d queued records (waiting up to %.0f s)", pending, self.flush_timeout_s)
        self._thread.join(timeout=self.flush_timeout_s + 30)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        self.dropped += left
        if left:
            log.warning("MLflow: %d records could not be delivered to %s and were dropped", left, self.uri)
        shutil.rmtree(self._staging, ignore_errors=True)


def log_to_existing_run(uri: str, run_id: str, metrics: dict[str, float], step: int, artifact: Path | None,
                        artifact_path: str) -> bool:
    """Add `metrics` (and a file) to an existing MLflow run, for commands that record into a training's run after
    it ended (`pipeline.evaluate`); warn and return False if that fails."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        log.warning("MLflow store %s does not exist here (run from the training's directory, or set "
                    "MLFLOW_TRACKING_URI); results not logged to run %s", uri, run_id)
        return False
    try:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(uri)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        client.log_batch(run_id, metrics=batch)
        if artifact is not None:
            client.log_artifact(run_id, str(artifact), artifact_path)
    except Exception as err:  # noqa: BLE001 - tracking never fails an evaluation
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        log.warning("could not log to MLflow run %s at %s (%s); the results are in the JSON file", run_id, uri,
                    reason)
        return False
    return True
