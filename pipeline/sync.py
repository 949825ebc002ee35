"""Upload a run directory's record to MLflow: `python -m pipeline.sync RUN_DIR [--uri URI] [--run-id ID]`.

For a run that trained without its MLflow store (it could not be opened at start-up and tracking.required was
false): its parameters, metrics, sample grids and results become an MLflow run. With --run-id, the run it
started in gets only the steps after its last one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError, from_yaml
from pipeline.tracking.trackers import resolve_uri
from pipeline.tracking.upload import upload_run_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's folder (its run_dir)")
    parser.add_argument("--uri", default="", help="MLflow tracking URI (default: the run's tracking.uri, else "
                        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--run-id", default=None, help="add to this existing run instead of creating one")
    parser.add_argument("--experiment", default="", help="experiment (default: the run's tracking.experiment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = from_yaml((args.run_dir / "config.yaml").read_text())
        uri = resolve_uri(args.uri or cfg.tracking.uri)
        run_id, steps = upload_run_dir(args.run_dir, uri, args.experiment or cfg.tracking.experiment, args.run_id)
    except (OSError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - MLflow's own errors: say them in a line
        print(f"error: could not upload {args.run_dir} to MLflow: {str(err).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    print(f"{args.run_dir}: {steps} logged step(s) uploaded to MLflow run {run_id} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
