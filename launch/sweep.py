"""Submit a grid of training runs as one Slurm job array: `python -m launch.sweep --config X.yaml --grid ...`.

    python -m launch.sweep --config configs/horse2zebra.yaml --slurm-config example_gpu \\
        --grid 'optim.lr=[1e-4,2e-4]' --grid 'loss.lambda_a=[5,10]' --array-parallelism 2 train.steps=100000

Each element of the grids' product is one array task (Submitit's map_array) with its own run directory
`<run_dir>/<NN>_<key>=<value>...` and so its own MLflow run (named after that folder, with every setting logged as
a param). Every element's config is checked before anything is submitted. Each element is a `TrainJob`: it
survives time limits and preemption like a single run. Other arguments are those of `launch.slurm`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from launch.slurm import (
    TrainJob,
    check_compatible,
    code_on_pythonpath,
    describe,
    job_shape,
    load_slurm_config,
    log_folder,
    make_executor,
    sbatch_script,
    split_overrides,
    tracking_uri,
)
from pipeline.config import ConfigError, load_config, to_yaml

log = logging.getLogger("launch.sweep")


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`key=[v1,v2,...]` (or `key=v1,v2`) -> (key, ['v1', 'v2', ...]); values stay text for load_config to type."""
    key, sep, values = text.partition("=")
    key, values = key.strip(), values.strip()
    if not sep or not key or not values:
        raise ConfigError(f"--grid '{text}' is not of the form key=[value1,value2,...]")
    if key.startswith("slurm."):
        raise ConfigError(f"--grid '{text}': a sweep varies training settings; slurm settings are one per array")
    if values.startswith("[") and values.endswith("]"):
        values = values[1:-1]
    items = [v.strip() for v in values.split(",")]
    if not all(items):
        raise ConfigError(f"--grid '{text}' has an empty value")
    return key, items


def element_name(index: int, combo: Sequence[tuple[str, str]]) -> str:
    """A folder name for one element: its index, then its short key=value pairs."""
    parts = [f"{key.rpartition('.')[2]}={value}" for key, value in combo]
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join([f"{index:02d}", *parts]))


@dataclass
class Element:
    name: str
    overrides: list[str]
    """The grid's key=value pairs of this element."""
    cfg: DictConfig


def expand(config_files: Sequence[str], train_overrides: Sequence[str], grids: Sequence[str]) -> list[Element]:
    """One checked training config per element of the grids' product."""
    if not grids:
        raise ConfigError("no --grid given: use launch.slurm for a single run")
    axes = [parse_grid(g) for g in grids]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a key appears in more than one --grid: {', '.join(keys)}")
    base = load_config(config_files, train_overrides)
    run_name = base.tracking.run_name or Path(base.run_dir).name
    elements = []
    for index, values in enumerate(itertools.product(*(v for _, v in axes))):
        combo = list(zip(keys, values))
        name = element_name(index, combo)
        pairs = [f"{k}={v}" for k, v in combo]
        placed = [f"run_dir={Path(base.run_dir) / name}", f"tracking.run_name={run_name}/{name}"]
        cfg = load_config(config_files, [*train_overrides, *placed, *pairs])
        elements.append(Element(name, pairs, cfg))
    return elements


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="training YAML (repeatable, in order)")
    parser.add_argument("--slurm-config", action="append", default=[],
                        help="slurm YAML: a path or a name in configs/slurm/ (repeatable, in order)")
    parser.add_argument("--grid", action="append", default=[], help="key=[v1,v2,...] (repeatable: the product)")
    parser.add_argument("--array-parallelism", type=int, default=None,
                        help="array elements running at once (slurm.array_parallelism)")
    parser.add_argument("--dry-run", action="store_true", help="print the elements and the array's sbatch script")
    parser.add_argument("overrides", nargs="*", help="slurm.KEY=VALUE (the jobs) and KEY=VALUE (all elements)")
    return parser.parse_intermixed_args(argv)


@dataclass
class SweepSubmission:
    jobs: list
    elements: list[Element]
    slurm: DictConfig
    folder: Path
    script: str = ""


def submit(argv: Sequence[str] | None = None) -> SweepSubmission:
    """Check every element's config and submit the array (or only build its script with --dry-run)."""
    args = parse_args(argv)
    slurm_overrides, train_overrides = split_overrides(args.overrides)
    if args.array_parallelism is not None:
        slurm_overrides.append(f"array_parallelism={args.array_parallelism}")
    s = load_slurm_config(args.slurm_config, slurm_overrides)
    elements = expand(args.config, train_overrides, args.grid)
    for element in elements:
        check_compatible(s, element.cfg)
    shapes = {job_shape(s, e.cfg) for e in elements}
    if len(shapes) > 1:
        raise ConfigError("the grid changes the job's size (e.g. data.workers with slurm.cpus_per_task=0): "
                          "set slurm.cpus_per_task explicitly")
    shape = shapes.pop()
    base_dir = Path(elements[0].cfg.run_dir).parent
    folder = log_folder(s, str(base_dir))
    job_name = s.job_name or base_dir.name
    if args.dry_run:
        script = sbatch_script(s, shape, folder, job_name, array_size=len(elements)) if s.cluster == "slurm" else ""
        return SweepSubmission([], elements, s, folder, script)
    if s.cluster == "local" and len(elements) > s.array_parallelism:
        log.warning("the local executor starts all %d elements at once (slurm.array_parallelism applies to Slurm)",
                    len(elements))
    executor = make_executor(s, shape, folder, job_name)
    with code_on_pythonpath():
        jobs = executor.map_array(TrainJob(shape.cpus_per_task), [to_yaml(e.cfg) for e in elements])
    return SweepSubmission(jobs, elements, s, folder)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sub = submit(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shape = job_shape(sub.slurm, sub.elements[0].cfg)
    if not sub.jobs:
        print(describe(sub.slurm, shape))
        for element in sub.elements:
            print(f"# element {element.name}: {' '.join(element.overrides)} -> {Path(element.cfg.run_dir).resolve()}")
        print(sub.script or f"# cluster={sub.slurm.cluster}: no sbatch script; Submitit starts the tasks itself.")
        return 0
    array_id = str(sub.jobs[0].job_id).split("_")[0]
    print(f"Submitted {len(sub.jobs)} runs (job array {array_id}, at most {sub.slurm.array_parallelism} at once), "
          f"each {shape.nodes} node(s) x {shape.tasks_per_node} task(s); logs in {sub.folder}")
    for job, element in zip(sub.jobs, sub.elements):
        print(f"  {job.job_id}: {' '.join(element.overrides)} -> {Path(element.cfg.run_dir).resolve()}")
    first = sub.elements[0].cfg
    print(f"  MLflow: one run per element in experiment '{first.tracking.experiment}' at {tracking_uri(first)}, "
          f"named like '{first.tracking.run_name}'")
    if sub.slurm.cluster == "debug":
        for job in sub.jobs:
            print(job.result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
