"""Mosaic TPU kernels, checked on CPU in TPU interpret mode."""
