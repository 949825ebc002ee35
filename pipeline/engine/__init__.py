"""Generic training infrastructure, free of GAN code: distributed environment, checkpoint files, stop signals,
learning-rate schedule, metric meter, progress lines, code version."""
