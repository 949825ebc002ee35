"""Upload what a run kept in its run directory to MLflow: for runs that trained while the store was away.

A run whose MLflow store could not be opened at start-up trains anyway (tracking.required=false) and keeps its
record in run_dir: config.yaml, metrics.jsonl, samples/ and the evaluation JSON files. This turns that record into
an MLflow run: parameters from the config, every metric at its step, the sample grids as images with their steps,
and the config and results as artifacts. Given the id of a run that has part of the record (one that trained
without its store for a while), it adds the steps that run lacks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import flatten, from_yaml

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records ({"step": s, key: value, ...}); a line cut by a crash is left out."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("%s: left out a damaged line (%s...)", path, line[:60])
    return records


def upload_run_dir(run_dir: Path, uri: str, experiment: str, run_id: str | None = None,
                   run_name: str | None = None) -> tuple[str, int]:
    """Create (or continue) an MLflow run from `run_dir`'s record; returns its id and the metric steps sent."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    import mlflow
    from mlflow.entities import Metric, Param

    from pipeline.tracking.trackers import first_use_lock

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no config.yaml: it is not a run directory")
    cfg = from_yaml(config_path.read_text())
    with first_use_lock(uri):
        client = mlflow.MlflowClient(uri)
        have: set[int] = set()
        created = not run_id
        if run_id:
            have = {m.step for m in client.get_metric_history(run_id, "lr")}
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, run_name=run_name or run_dir.name,
                                       tags={"uploaded_from": str(run_dir.resolve())}).info.run_id
            params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i : i + 100])
            client.log_artifact(run_id, str(config_path))
    # One record per step (a step that a resume ran again is in the file twice, with equal values), and only the
    # steps the run lacks: uploading twice adds nothing, and the gap an outage left is filled in.
    by_step = {int(record.pop("step")): record for record in read_metrics(run_dir)}
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for step, record in sorted(by_step.items()) if step not in have
               for k, v in record.items() if isinstance(v, (int, float))]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for grid in sorted((run_dir / "samples").glob("step-*.png")):
        step = int(re.sub(r"\D", "", grid.stem) or 0)
        if step not in have:
            client.log_image(run_id, np.asarray(Image.open(grid).convert("RGB")), key="samples", step=step)
    for result in sorted(run_dir.glob("*.json")):
        client.log_artifact(run_id, str(result), "results")
    if created:
        client.set_terminated(run_id, "FINISHED")  # A run it created; a run it added to keeps its status.
    return run_id, len([step for step in by_step if step not in have])
