"""Experiment tracking: the tracker protocol, the no-op and MLflow trackers, and the recorder of rank-0 side
effects."""
