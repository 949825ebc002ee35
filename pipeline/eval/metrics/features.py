"""Feature extractors for FID and KID, loaded from local files only (nothing is ever downloaded).

An extractor is any callable module that maps a batch of images (N, 3, H, W) in [-1, 1] to (N, D) features, with
a `name` attribute saying what it is (tests pass small ones). `load_extractor(path)` accepts:

- an Inception state dict with torchvision's parameter names: FID's network, as pytorch-fid
  (`pt_inception-2015-12-05-6726825d.pth`), torch-fidelity and torchmetrics
  (`weights-inception-2015-12-05-6726825d.pth`) ship it, or torchvision's ImageNet `inception_v3_google-*.pth`
  (not the FID network: its numbers are not comparable to published FIDs). Images are resized to 299x299
  bilinearly as pytorch-fid does.
- NVIDIA's TorchScript Inception (`inception-2015-12-05.pt`, used by StyleGAN2-ADA/3 and clean-fid), called as
  `net(images_0_255, return_features=True)`; it resizes inside.
- any other TorchScript module: called on the [-1, 1] batch; its output is flattened to (N, D).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.eval.metrics.inception import InceptionV3

FID_WEIGHT_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
ENV_VAR = "CYCLEGAN_INCEPTION_WEIGHTS"
HOW_TO_PROVIDE = (
    "FID and KID need Inception-v3 weights from a local file, and nothing is downloaded. On a machine with "
    "internet access fetch one of\n"
    "  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth\n"
    "  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth\n"
    "  https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt\n"
    f"and pass it with --features PATH (training: eval.features=PATH), set {ENV_VAR}=PATH, or put one of the "
    "first two in torch's hub cache ({cache}), where pytorch-fid, torch-fidelity and torchmetrics keep them."
)


class FeatureError(RuntimeError):
    """No usable feature extractor, and what to do about it."""


class InceptionFeatures(nn.Module):
    """pool3 features of an Inception-v3 state dict: resize to 299 (bilinear), then the network."""

    def __init__(self, state: dict[str, Tensor], source: str) -> None:
        super().__init__()
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.") and "num_batches_tracked" not in k}
        classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        # The FID graph has 1008 classes; torchvision's ImageNet model 1000.
        self.fid_blocks = classes == 1008
        self.net = InceptionV3(fid_blocks=self.fid_blocks, num_classes=classes or 1008)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if "num_batches_tracked" not in k]
        if missing or unexpected:
            raise FeatureError(
                f"'{source}' is not an Inception-v3 state dict with torchvision's names "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.net.eval().requires_grad_(False)
        variant = "FID Inception (TF 2015-12-05)" if self.fid_blocks else "torchvision Inception, not FID's"
        self.name = f"{variant}: {Path(source).name}"

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


class TorchScriptFeatures(nn.Module):
    """A TorchScript feature network; NVIDIA's Inception takes [0, 255] images and `return_features`."""

    def __init__(self, module: torch.jit.ScriptModule, source: str) -> None:
        super().__init__()
        self.module = module.eval()
        schema = str(getattr(module.forward, "schema", ""))
        self.nvidia = "return_features" in schema
        self.name = f"{'NVIDIA Inception (TorchScript)' if self.nvidia else 'TorchScript'}: {Path(source).name}"

    def forward(self, images: Tensor) -> Tensor:
        if self.nvidia:
            out = self.module((images.float() + 1) * 127.5, return_features=True)
        else:
            out = self.module(images.float())
        return out.flatten(1).float()


def load_extractor(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """A feature extractor from a local file (see the module doc); raises FeatureError if it is none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FeatureError(f"feature extractor file '{path}' does not exist.\n" + how_to_provide())
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # noqa: BLE001 - not TorchScript: a state dict, then
        scripted = None
    if scripted is not None:
        return TorchScriptFeatures(scripted, str(path)).to(device).eval()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign files
        raise FeatureError(f"'{path}' is neither TorchScript nor a state dict ({type(err).__name__})") from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise FeatureError(f"'{path}' is a state dict but not of Inception-v3 (torchvision's parameter names)")
    return InceptionFeatures(state, str(path)).to(device).eval()


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def how_to_provide() -> str:
    return HOW_TO_PROVIDE.format(cache=_hub_checkpoints())


def find_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """The Inception weight file to use: `explicit`, else $CYCLEGAN_INCEPTION_WEIGHTS, else FID's weights in
    torch's hub cache (where pytorch-fid, torch-fidelity and torchmetrics keep them); None if there is none.
    """
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    for name in FID_WEIGHT_NAMES:
        candidate = _hub_checkpoints() / name
        if candidate.is_file():
            return candidate
    return None
