"""Mosaic GPU (``plgpu.kernel``) kernels for Hopper and later NVIDIA GPUs."""
