"""Inference: loading generators (our checkpoints or reference files), padded translation, export, interop."""
