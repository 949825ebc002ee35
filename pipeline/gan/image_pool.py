"""History of generated images for the discriminator step (Shrivastava et al. 2017, as in CycleGAN)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ImagePool:
    """Keeps up to `size` past fakes; each query returns a mix of new and stored images.

    While the pool fills, a new image is stored and returned. Once full, each image is, with probability 0.5,
    swapped for a random stored one (which is returned), else returned as is. The draws come from a private
    generator, so each rank's pool is reproducible and independent of any other random stream. Images are stored
    at least in float32, on the device they arrive on: under autocast the D step then sees one dtype.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.images: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._undo: tuple[list[Tensor], Tensor] | None = None

    def query(self, images: Tensor) -> Tensor:
        """Return a batch the size of `images` drawn from the history; `images` must be detached."""
        if self.size == 0:
            return images
        self._undo = (list(self.images), self.generator.get_state())
        out = []
        images = images.detach()
        if images.dtype in (torch.float16, torch.bfloat16):
            images = images.float()
        for image in images:
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                index = int(torch.randint(0, self.size, (), generator=self.generator).item())
                out.append(self.images[index])
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)

    def undo_last_query(self) -> None:
        """Forget the last query's changes (used when its step is skipped for a non-finite loss)."""
        if self._undo is not None:
            self.images, state = self._undo
            self.generator.set_state(state)
            self._undo = None

    def state_dict(self) -> dict[str, Any]:
        # On the images' device: a checkpoint stages it to (pinned) host memory itself.
        images = torch.cat(self.images) if self.images else torch.empty(0)
        return {"size": self.size, "images": images, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore stored images (at most `self.size` of them) and the draw generator."""
        images = state["images"]
        self.images = [img.unsqueeze(0).to(device) for img in images][: self.size]
        self.generator.set_state(state["generator"])
