"""The data section of a config as `train_loader` reads it, for tests that build loaders directly."""

from __future__ import annotations

from types import SimpleNamespace


def data_cfg(shards: dict[str, str], **extra) -> SimpleNamespace:
    """Small crops of `shards` (trainA/trainB patterns), batches of 2, 2 workers; `extra` overrides."""
    values = dict(train_a=shards["trainA"], train_b=shards["trainB"], preprocess="resize_and_crop", load_size=36,
                  crop_size=32, flip=True, batch_per_rank=2, workers=2, shuffle_buffer=16, prefetch_factor=2,
                  remote_retry_s=120.0, max_image_pixels=89_478_485)
    values.update(extra)
    return SimpleNamespace(**values)
