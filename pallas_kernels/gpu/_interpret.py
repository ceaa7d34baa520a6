"""The one private JAX import of the GPU kernels: the Mosaic GPU interpreter's parameters.

jax 0.10.2 ships an interpreter that runs ``plgpu.kernel`` bodies on CPU (TMA copies,
barriers, wgmma, several warpgroups) but exports its parameter class only from
``jax._src``. CI has no GPU, so the kernels' tests run through it; keeping the import here
means one line to change when JAX makes it public or moves it.
"""

from __future__ import annotations


def params():
  """``interpret=`` argument of ``plgpu.kernel`` for a CPU run (reads of uninitialized
  shared memory give NaN, so a kernel that uses memory it never wrote fails its tests)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as err:  # pragma: no cover - depends on the installed jax
    raise NotImplementedError(
        "this jax has no Mosaic GPU interpreter (jax._src.pallas.mosaic_gpu.interpret); "
        "run the GPU kernels on a GPU") from err
  return InterpretGPUParams(uninitialized_memory="nan")


def available() -> bool:
  try:
    params()
  except NotImplementedError:
    return False
  return True
