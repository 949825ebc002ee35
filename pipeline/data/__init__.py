"""Data: WebDataset streams and augmentation, image conversions, writing and inspecting shards."""
