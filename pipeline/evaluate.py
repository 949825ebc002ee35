"""Evaluation of trained generators against held-out data."""

from __future__ import annotations

import torch
from torch import nn
from webdataset.tariterators import tarfile_samples

from pipeline.data import DataError, decode_image, expand_pattern, to_tensor


def _by_key(pattern: str, size: int) -> dict[str, torch.Tensor]:
    out = {}
    for sample in tarfile_samples([{"url": url} for url in expand_pattern(pattern)]):
        out[sample["__key__"]] = to_tensor(decode_image(sample).resize((size, size)))
    return out


@torch.no_grad()
def paired_l1(
    generator: nn.Module, source_pattern: str, target_pattern: str, size: int, device: torch.device,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean absolute error (in [-1, 1] units) of G(source) against paired ground truth, next to doing nothing.

    Pairs are matched by sample key, as the synthetic set writes them. Returns `l1_translation` (G's error),
    `l1_identity` (error of returning the input unchanged) and `pairs`.
    """
    source, target = _by_key(source_pattern, size), _by_key(target_pattern, size)
    keys = sorted(set(source) & set(target))
    if not keys:
        raise DataError(f"no sample keys are shared by '{source_pattern}' and '{target_pattern}': no pairs")
    was_training = generator.training
    generator.eval()
    err_g = err_id = 0.0
    for i in range(0, len(keys), batch_size):
        chunk = keys[i : i + batch_size]
        x = torch.stack([source[k] for k in chunk]).to(device)
        y = torch.stack([target[k] for k in chunk]).to(device)
        err_g += (generator(x).float() - y).abs().mean(dim=(1, 2, 3)).sum().item()
        err_id += (x - y).abs().mean(dim=(1, 2, 3)).sum().item()
    generator.train(was_training)
    return {"l1_translation": err_g / len(keys), "l1_identity": err_id / len(keys), "pairs": float(len(keys))}
