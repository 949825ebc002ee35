"""Generators loaded for inference: from our checkpoints or reference weight files, padded to the size
multiple each architecture needs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from pipeline.config import GENERATORS, ConfigError, from_yaml, load_config
from pipeline.data.pixels import PixelFormat, formats_from
from pipeline.engine.checkpoint import FORMAT, CheckpointError, is_checkpoint_directory, load_checkpoint
from pipeline.gan.methods import DIRECTIONS as METHOD_DIRECTIONS
from pipeline.gan.methods import translator_from
from pipeline.gan.networks import use_group_kernel_instance_norm, uses_group_kernel_norm
from pipeline.infer.interop import load_into, read_state_dict

log = logging.getLogger("pipeline.translate")

DIRECTIONS = ("AtoB", "BtoA")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_REFERENCE_FILE = re.compile(r"^(?P<prefix>.*_net_)G_(?P<which>[AB])\.pth$")
# CUT's reference code saves its one generator as `<epoch>_net_G.pth` (A->B).
_CUT_FILE = re.compile(r"^(?P<prefix>.*_net_)G\.pth$")
# The generator settings a reference weight file does not record: given as --model.* options.
MODEL_OPTIONS = ("generator", "ngf", "norm", "padding", "norm_groups")


# Padding to what the network needs.


def required_multiple(arch: str) -> int:
    """Side multiple a generator needs: its two stride-2 steps (resnet) or 2**num_downs (unet)."""
    return GENERATORS[arch]


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source rows of a reflect padding of a length-n axis by (before, after), without F.pad's limit.

    F.pad's reflect needs pads smaller than the side; a small image for a unet_256 needs more. Indexing the
    mirrored, periodic extension (period 2n - 2) equals F.pad's reflect wherever that applies, pads any
    amount, and exports to TorchScript and ONNX without shape-dependent branches.
    """
    idx = torch.arange(-before, n + after, device=device)
    # A tensor, not a Python int: the ONNX exporter cannot take the remainder by a symbolic scalar.
    period = torch.full_like(idx[:1], 2 * n - 2).clamp_min(1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad_to(x: Tensor, height: int, width: int) -> tuple[Tensor, int, int]:
    """Reflect-pad (N, C, h, w) to (N, C, height, width), the padding split evenly between the two sides.

    Returns the padded tensor and the (top, left) offset of the original inside it.
    """
    h, w = x.shape[-2], x.shape[-1]
    top, left = (height - h) // 2, (width - w) // 2
    rows = _reflect_index(h, top, height - h - top, x.device)
    cols = _reflect_index(w, left, width - w - left, x.device)
    return x.index_select(-2, rows).index_select(-1, cols), top, left


class PaddedGenerator(nn.Module):
    """A generator that takes any image size: reflect-pad to `multiple`, translate, crop back.

    This is what `pipeline.export` exports; `translate_images` does the same per image, so that images of
    different sizes can share a batch.
    """

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        padded, top, left = reflect_pad_to(x, (h + m - 1) // m * m, (w + m - 1) // m * m)
        return self.net(padded)[:, :, top : top + h, left : left + w]


# Loading generators.


@dataclass
class Generators:
    """The generator of one direction, the opposite one where known, and where they came from."""

    net: nn.Module
    """Translates the requested direction (eval mode, CPU)."""
    reverse: nn.Module | None
    """The opposite direction (for the cycle error); None for a reference file without its G_A/G_B sibling."""
    model: DictConfig
    """Generator architecture (`model.*` of the config)."""
    cfg: DictConfig
    """The checkpoint's resolved config, or defaults plus overrides for reference files."""
    direction: str
    source: str
    """'checkpoint' (ours) or 'reference' (reference-implementation weight files)."""
    step: int | None = None
    run_id: str | None = None
    """MLflow run id recorded in our checkpoint."""
    weights: str = "raw"
    """'ema' (the generators' moving average) or 'raw'."""

    @property
    def multiple(self) -> int:
        return required_multiple(self.model.generator)

    def formats(self) -> tuple[PixelFormat, PixelFormat]:
        """The PixelFormat of the direction's source and target domains (channels, depth, intensity mapping),
        as the checkpoint's config records them (8-bit RGB for a config from before them)."""
        formats = formats_from(self.cfg)
        return (formats["A"], formats["B"]) if self.direction == "AtoB" else (formats["B"], formats["A"])

    def to(self, device: torch.device) -> Generators:
        """Both generators on `device`, their instance norms on the kernel training would use there.

        The kernel is the config's `perf.instance_norm_kernel` resolved for `device` as training resolves it,
        so evaluating a checkpoint repeats the computation of the evaluation during training bit for bit.
        """
        group_kernel = uses_group_kernel_norm(self.cfg.perf.instance_norm_kernel, device)
        for net in (self.net, self.reverse):
            if net is not None:
                if group_kernel:
                    use_group_kernel_instance_norm(net)
                net.to(device)
        return self


def _reference_files(path: Path, direction: str) -> tuple[Path, Path | None]:
    """(file of `direction`, file of the opposite direction or None) for a reference file or folder."""
    which = "A" if direction == "AtoB" else "B"
    cut = path / "latest_net_G.pth" if path.is_dir() else path
    if _CUT_FILE.match(cut.name) and cut.is_file() and not (path / "latest_net_G_A.pth").is_file():
        if direction != "AtoB":
            raise CheckpointError(f"'{cut}' is a CUT generator (one generator, A->B): it has no B->A direction")
        return cut, None
    if path.is_dir():
        forward = path / f"latest_net_G_{which}.pth"
        if not forward.is_file():
            raise CheckpointError(f"reference folder '{path}' has no {forward.name} (needed for {direction})")
    else:
        forward = path
        match = _REFERENCE_FILE.match(path.name)
        if match and match["which"] != which:
            wanted = path.with_name(f"{match['prefix']}G_{which}.pth").name
            raise CheckpointError(
                f"'{path.name}' is the reference's G_{match['which']} "
                f"({'A->B' if match['which'] == 'A' else 'B->A'}); for {direction} pass {wanted} or its folder"
            )
    match = _REFERENCE_FILE.match(forward.name)
    if not match:
        return forward, None
    other = forward.with_name(f"{match['prefix']}G_{'B' if which == 'A' else 'A'}.pth")
    return forward, other if other.is_file() else None


def infer_generator_settings(state: dict[str, Tensor], direction: str = "AtoB") -> dict[str, Any]:
    """The model.generator / ngf / norm (/ padding, channels) a reference generator state dict implies (empty if
    unrecognised). Replicate and reflect padding have the same keys: reflect, the default, is assumed. Channels
    other than 3 (the reference's --input_nc/--output_nc) come as model.channels_a/b, for a file that
    translates `direction`.

    The reference's files do not record their options, but their keys do: resnet files have `model.1.weight`
    (ngf filters) and one `conv_block` per residual block; unet files nest `model.` once per downsampling.
    The first convolution has a bias exactly for instance norm; batch norm has affine weights after it.
    """
    if "model.1.weight" in state and any(key.endswith(".filt") for key in state):
        # CUT's antialiased generator: blur-pool filters (3x3 down, 4x4 up) are saved buffers.
        blocks = {key.split(".")[1] for key in state if ".conv_block." in key}
        arch = {6: "resnet_6blocks", 9: "resnet_9blocks"}.get(len(blocks))
        sizes = {state[key].shape[-1] for key in state if key.endswith(".filt")}
        settings = {"method": "cut", "ngf": int(state["model.1.weight"].shape[0]),
                    "norm": "instance" if "model.1.bias" in state else "none", "antialias": 3 in sizes,
                    "antialias_up": 4 in sizes, **_channel_settings(state, direction)}
        return {**settings, "generator": arch} if arch else settings
    if "model.1.weight" in state:
        blocks = {key.split(".")[1] for key in state if ".conv_block." in key}
        arch = {6: "resnet_6blocks", 9: "resnet_9blocks"}.get(len(blocks))
        first, norm_weight = "model.1", "model.2.weight"
    elif "model.model.0.weight" in state:
        arch = {7: "unet_128", 8: "unet_256"}.get(max(key.count("model") for key in state) - 1)
        first, norm_weight = "model.model.0", "model.model.1.model.2.weight"
    else:
        return {}
    norm = "instance" if f"{first}.bias" in state else "batch" if norm_weight in state else "none"
    settings: dict[str, Any] = {"ngf": int(state[f"{first}.weight"].shape[0]), "norm": norm}
    if any(".conv_block.0.weight" in key for key in state):
        settings["padding"] = "zero"  # The block's first layer is its convolution: no padding layer in front.
    settings.update(_channel_settings(state, direction))
    return {**settings, "generator": arch} if arch else settings


def _channel_settings(state: dict[str, Tensor], direction: str) -> dict[str, int]:
    """model.channels_a/b from the first convolution's input and the last one's output (none if both are 3)."""
    if "model.1.weight" in state:  # ResNet: the last top-level convolution makes the output.
        last = max(int(key.split(".")[1]) for key in state
                   if re.fullmatch(r"model\.\d+\.weight", key) and state[key].ndim == 4)
        source, target = state["model.1.weight"].shape[1], state[f"model.{last}.weight"].shape[0]
    else:  # U-Net: the outermost block's down- and up-convolution (a transposed one: weights are in x out).
        source, target = state["model.model.0.weight"].shape[1], state["model.model.3.weight"].shape[1]
    if source == target == 3:
        return {}
    names = ("channels_a", "channels_b") if direction == "AtoB" else ("channels_b", "channels_a")
    return {names[0]: int(source), names[1]: int(target)}


WEIGHTS = ("auto", "ema", "raw")


def generators_file(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's generators (raw and EMA) with its config and counters, as one self-contained dict: what
    translate, evaluate and export need, without discriminators, optimisers or pools. It is what best.pt and
    uploaded checkpoints hold, and what `python -m pipeline.pack` writes for sharing."""
    names = list(METHOD_DIRECTIONS[state["model"].get("method", "cyclegan")].values())
    out = {key: state[key] for key in ("step", "images_seen", "config", "model", "mlflow_run_id", "code_version")
           if key in state}
    out.update(format=FORMAT, kind="generators", nets={name: state["nets"][name] for name in names})
    if "ema" in state:
        ema = state["ema"]
        out["ema"] = {**{k: v for k, v in ema.items() if k != "nets"},
                      "nets": {name: ema["nets"][name] for name in names if name in ema["nets"]}}
    return out


def load_generators(path: str | Path, direction: str = "AtoB", model_overrides: Sequence[str] = (),
                    weights: str = "auto") -> Generators:
    """Generators from one of our checkpoints, a reference `*_net_G_{A,B}.pth` file or a reference folder.

    Args:
        path: the checkpoint, weight file or folder.
        direction: AtoB (our G_ab, the reference's G_A) or BtoA.
        model_overrides: `model.generator=...`-style settings for reference files, which do not record their
            architecture (defaults: the paper's resnet_9blocks, ngf 64, instance norm).
        weights: ema (the generators' moving average, train.ema_decay), raw (the trained weights), or auto: ema
            when the checkpoint has it. Reference files have raw weights only.

    Raises:
        CheckpointError: unreadable file, wrong direction, or weights that do not fit the architecture.
        ConfigError: a bad override.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be AtoB or BtoA, got '{direction}'")
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    ckpt = None
    if is_checkpoint_directory(path):
        ckpt = load_checkpoint(path, ranks=None)
    elif path.is_file():
        try:
            ckpt = load_checkpoint(path, ranks=None)
        except CheckpointError as err:
            # A plain state dict is a reference file; anything else that fails to load is reported as ours.
            if "not a training checkpoint" not in str(err) and not _REFERENCE_FILE.match(path.name):
                raise
    if ckpt is not None:
        if model_overrides:
            raise ConfigError(f"'{path}' records its architecture; --model.* options are for reference files only")
        cfg = from_yaml(ckpt["config"])
        method_names = METHOD_DIRECTIONS[cfg.model.method]
        if direction not in method_names:
            raise CheckpointError(f"'{path}' is a {cfg.model.method} checkpoint: one generator, A->B only; it has "
                                  f"no {direction} direction")
        names = tuple(method_names[d] for d in (direction, "BtoA" if direction == "AtoB" else "AtoB")
                      if d in method_names)
        ema = ckpt.get("ema") if ckpt.get("ema", {}).get("started") else None
        if weights == "ema" and ema is None:
            raise CheckpointError(f"'{path}' has no generator EMA (trained without train.ema_decay, or stopped "
                                  "before train.ema_start_step): use --weights raw")
        use_ema = ema is not None and weights != "raw"
        nets: list[nn.Module | None] = []
        for name, way in zip(names, (direction, "BtoA" if direction == "AtoB" else "AtoB")):
            net = translator_from(cfg.model, way)
            load_into(net, (ema["nets"] if use_ema else ckpt["nets"])[name], str(path), name)
            nets.append(net.eval())
        nets += [None] * (2 - len(nets))
        log.info("%s: %s weights", path.name, "EMA" if use_ema else "raw")
        return Generators(nets[0], nets[1], cfg.model, cfg, direction, "checkpoint", ckpt.get("step"),
                          ckpt.get("mlflow_run_id") or None, "ema" if use_ema else "raw")

    if weights == "ema":
        raise CheckpointError(f"'{path}' is a reference-implementation file: it has raw weights only (--weights raw)")
    forward_file, reverse_file = _reference_files(path, direction)
    states = [read_state_dict(file) if file is not None else None for file in (forward_file, reverse_file)]
    # Settings given explicitly win over those read off the file's keys.
    given = {item.split("=", 1)[0] for item in model_overrides}
    settings = infer_generator_settings(states[0], direction)
    inferred = [f"model.{k}={v}" for k, v in settings.items() if f"model.{k}" not in given]
    if inferred:
        log.info("%s: %s (from its keys)", forward_file.name, ", ".join(inferred))
    # The identity loss is a training setting that channels differing between A and B rule out.
    cfg = load_config(overrides=[*inferred, *model_overrides, "loss.lambda_idt=0"])
    what = f"{cfg.model.generator} generator (ngf {cfg.model.ngf}, {cfg.model.norm})"
    nets = []
    for file, state, way in zip((forward_file, reverse_file), states, (direction, "BtoA" if direction == "AtoB"
                                                                           else "AtoB")):
        if state is None:
            nets.append(None)
            continue
        net = translator_from(cfg.model, way)
        load_into(net, state, str(file), what)
        nets.append(net.eval())
    return Generators(nets[0], nets[1], cfg.model, cfg, direction, "reference")
