"""CUT and FastCUT (Park et al., ECCV 2020): one generator, a PatchNCE loss in place of the cycle loss."""
