"""Submitit launchers: `launch.slurm` submits one training run, `launch.sweep` a grid of runs as a job array."""
