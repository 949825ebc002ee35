"""Interop with the reference implementation's weight files (`<epoch>_net_G_A.pth`, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.gan.cyclegan import REFERENCE_NAMES
from pipeline.gan.networks import discriminator_from, generator_from

# InstanceNorm statistics that PyTorch < 0.4 saved; the reference deletes them on load too.
_STALE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A reference weight file as a state dict, refusing files that are not plain tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"weight file '{path}' does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"weight file '{path}' cannot be loaded safely ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' is not a state dict of tensors")
    if hasattr(state, "_metadata"):
        del state._metadata
    return state


def load_into(net: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """load_state_dict(strict=True) with an error that says which architecture setting to change."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        state = {k: v for k, v in state.items() if not k.endswith(_STALE_SUFFIXES)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(
            f"'{source}' does not fit the configured {what} ({first}); set model.generator / "
            "model.discriminator / model.ngf / model.ndf / model.norm to the settings it was trained with"
        ) from None


def reference_networks_only(model_cfg, what: str) -> None:
    """The reference implementation has the paper's networks only: files of another variant cannot be shared."""
    variants = {key: getattr(model_cfg, key, "reference") for key in ("g_variant", "d_variant")}
    other = {key: value for key, value in variants.items() if value != "reference"}
    if other:
        named = ", ".join(f"model.{key}={value}" for key, value in other.items())
        raise CheckpointError(f"{what} has {named}: the reference implementation's files hold the paper's networks "
                              "only (model.g_variant=reference, model.d_variant=reference); share it with "
                              "`python -m pipeline.pack` or export it with `python -m pipeline.export` instead")


def load_generator(path: Path, model_cfg, direction: str = "AtoB") -> nn.Module:
    """A generator from our checkpoint (G_ab for AtoB, G_ba for BtoA) or from a reference `*_net_G_*.pth`."""
    path = Path(path)
    try:
        ckpt = load_checkpoint(path, ranks=None)
    except CheckpointError:
        ckpt = None
    net = generator_from(model_cfg, *(("a", "b") if direction == "AtoB" else ("b", "a")))
    if ckpt is not None:
        state = ckpt["nets"]["G_ab" if direction == "AtoB" else "G_ba"]
    else:
        state = read_state_dict(path)
    load_into(net, state, str(path), f"{model_cfg.generator} generator (ngf {model_cfg.ngf}, {model_cfg.norm})")
    return net


def load_reference_dir(directory: Path, nets: dict[str, nn.Module], epoch: str = "latest") -> list[str]:
    """Load `<epoch>_net_{G_A,G_B,D_A,D_B}.pth` from a reference checkpoint folder into our nets.

    Discriminator files are optional (a test-only download has generators alone). Returns the loaded names.
    """
    loaded = []
    for ours, theirs in REFERENCE_NAMES.items():
        path = Path(directory) / f"{epoch}_net_{theirs}.pth"
        if not path.exists():
            if ours.startswith("G"):
                raise CheckpointError(f"reference folder '{directory}' has no {path.name}")
            continue
        load_into(nets[ours], read_state_dict(path), str(path), ours)
        loaded.append(ours)
    return loaded


def export_reference(nets: dict[str, nn.Module], directory: Path, epoch: str = "latest") -> list[Path]:
    """Write our four networks as the reference's `<epoch>_net_<name>.pth` state dicts (CPU tensors)."""
    paths = []
    for ours, theirs in REFERENCE_NAMES.items():
        path = Path(directory) / f"{epoch}_net_{theirs}.pth"
        save_atomic({k: v.detach().cpu() for k, v in nets[ours].state_dict().items()}, path)
        paths.append(path)
    return paths


def nets_from_checkpoint(path: Path, model_cfg) -> dict[str, nn.Module]:
    """The four networks of one of our training checkpoints, on the CPU."""
    state = load_checkpoint(path, ranks=None)
    missing = [name for name in ("G_ab", "G_ba", "D_a", "D_b") if name not in state.get("nets", {})]
    if missing:
        what = "a generators file" if state.get("kind") == "generators" else "a checkpoint of another method"
        raise CheckpointError(f"'{path}' is {what}: it has no {', '.join(missing)}; export the four networks from "
                              "a ckpt-* checkpoint of a CycleGAN run")
    reference_networks_only(model_cfg, f"'{path}'")
    nets = {"G_ab": generator_from(model_cfg, "a", "b"), "G_ba": generator_from(model_cfg, "b", "a"),
            "D_a": discriminator_from(model_cfg, "a"), "D_b": discriminator_from(model_cfg, "b")}
    for name, net in nets.items():
        load_into(net, state["nets"][name], str(path), name)
    return nets
