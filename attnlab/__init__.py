"""attnlab: attention mechanisms for JAX, from the exact reference to Pallas kernels."""

from attnlab import ops

__version__ = "0.1.0"

__all__ = ["ops"]
