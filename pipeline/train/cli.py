"""CycleGAN training: `python -m pipeline.train --config configs/X.yaml key=value ...` (or under torchrun).

Exit codes: 0 done (or stopped cleanly under torchrun), 2 a config, data, checkpoint, run directory, tracking or
file-system problem (one log line says which and how to fix it; PIPELINE_DEBUG=1 adds the traceback), 3 stopped
by a signal or control.stop_after_steps (checkpointed; run it again to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from pipeline.config import ConfigError, load_config
from pipeline.data.stream import DataError
from pipeline.engine import dist
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.run_lock import RunDirError
from pipeline.engine.stop import EXIT_STOPPED
from pipeline.logs import report_error, setup_logging
from pipeline.tracking.recorder import TrackingError
from pipeline.train.loop import run

log = logging.getLogger("pipeline.train")


def held_out_summary(ev: dict[str, float], name: str = "G_ab") -> str:
    """The end-of-training line: the A->B generator's (`name`) held-out L1 against returning the input, worded
    by direction; and, where the evaluation has it, a second line with SSIM to the ground truth."""
    g, idt = ev["AtoB/l1"], ev["AtoB/l1_identity"]
    if g < idt:
        compared = f"{idt / max(g, 1e-12):.1f}x lower than identity"
    elif g > idt:
        compared = f"{g / max(idt, 1e-12):.1f}x higher than identity: worse than not translating"
    else:
        compared = "equal to identity"
    line = (f"held-out A->B L1 error over {int(ev['AtoB/pairs'])} pairs: {name} {g:.4f} vs identity {idt:.4f} "
            f"({compared})")
    if "AtoB/ssim" in ev and "AtoB/ssim_identity" in ev:
        ssim, ssim_idt = ev["AtoB/ssim"], ev["AtoB/ssim_identity"]
        verdict = "higher" if ssim > ssim_idt else "not higher"
        line += f"\nheld-out A->B SSIM to the ground truth: {name} {ssim:.4f} vs input {ssim_idt:.4f} ({verdict})"
    return line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, applied in order)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=1000")
    return parser.parse_args(argv)


@record
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = dist.read_env()
    setup_logging(info.rank)
    try:
        with dist.process_group_teardown():
            cfg = load_config(args.config, args.overrides)
            result = run(cfg)
    except (ConfigError, DataError, CheckpointError, RunDirError, TrackingError, OSError) as err:
        # The accidents of README "When things go wrong": one line that says what and how to fix it.
        report_error(log, err)
        return 2
    if result.stopped:
        # torchrun counts any non-zero exit as a crash (it restarts the group or reports a failure), so under
        # torchrun a clean stop exits 0; its log line says where it stopped.
        return 0 if os.environ.get("TORCHELASTIC_RUN_ID") else EXIT_STOPPED
    if "AtoB/l1" in result.evaluation and info.is_main:
        print(held_out_summary(result.evaluation, "G_ab" if cfg.model.method == "cyclegan" else "G"))
    return 0
