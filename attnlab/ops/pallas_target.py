"""Which Pallas kernel a ``pallas`` tier runs: the current backend's, or one named through
:func:`interpret_kernels`, which runs that backend's kernel in its Pallas interpreter on
any machine (slow; for tests and for reading a kernel on a laptop). Shared by every
mechanism's pallas tier (softmax, chunked linear attention)."""

from __future__ import annotations

import contextlib
import threading

import jax

from attnlab.ops import registry

KERNEL_BACKENDS = ("gpu", "tpu")
_STATE = threading.local()


@contextlib.contextmanager
def interpret_kernels(backend: str):
  """Within the block, pallas tiers run ``backend``'s kernels in their interpreter."""
  if backend not in KERNEL_BACKENDS:
    raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
  previous = getattr(_STATE, "interpret", None)
  _STATE.interpret = backend
  try:
    yield
  finally:
    _STATE.interpret = previous


def kernel_target() -> tuple[str | None, bool]:
  """(kernel backend, interpreted) for the current context, or (None, False)."""
  interpret = getattr(_STATE, "interpret", None)
  if interpret is not None:
    return interpret, True
  backend = registry.current_backend()
  return (backend, False) if backend in KERNEL_BACKENDS else (None, False)


def not_hopper_reason() -> str | None:
  """Why the Mosaic GPU kernels (sm_90a instructions: wgmma, TMA) cannot run compiled on
  this machine's first device, or None on a Hopper GPU."""
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not capability.startswith("9"):
    return f"the GPU kernels are built for Hopper (sm_90), this GPU is sm_{capability}"
  return None
