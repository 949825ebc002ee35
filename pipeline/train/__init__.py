"""The CycleGAN trainer: building the components, the training state, the loop, sample grids; the CLI in cli.py."""
