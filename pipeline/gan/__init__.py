"""GAN-specific code: the networks, losses, the CycleGAN objective, the image pool and one training step."""
