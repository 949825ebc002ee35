"""Evaluation of trained generators on held-out data, and the metrics it reports."""
