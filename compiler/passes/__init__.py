"""Fusion passes: each a pure, named rewrite from the model graph towards megakernel instructions."""
