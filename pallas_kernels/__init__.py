"""Pallas kernels behind attnlab's ``pallas`` tiers: ``gpu/`` (Mosaic GPU) and ``tpu/`` (Mosaic TPU)."""
