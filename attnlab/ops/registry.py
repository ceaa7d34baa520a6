"""One registry of mechanisms and their implementations, and the dispatcher.

Every mechanism is registered by name with its tiers: ``reference`` (the exact oracle),
``xla`` (the efficient pure-JAX form), and where they exist ``cudnn`` / ``pallas``. Each
tier comes with a ``supports(call)`` predicate that returns None when it can run the call
on the current backend and a sentence saying why not otherwise.

``implementation=None`` tries the tiers that join automatic dispatch in priority order
and takes the first that supports the call; a named tier that cannot run the call raises
``ValueError`` with its reason. Automatic dispatch never picks ``reference``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Supports = Callable[[Any], "str | None"]


def _always(call) -> None:
  del call
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One tier of one mechanism.

  Attributes:
    name: the tier's name (``"reference"``, ``"xla"``, ``"cudnn"``, ``"pallas"``).
    fn: the function; every tier of a mechanism takes the same arguments.
    supports: ``call -> None | reason``; ``call`` is the mechanism's canonical call.
    priority: higher runs first under automatic dispatch.
    automatic: whether ``implementation=None`` may pick this tier.
    automatic_supports: an extra ``call -> None | reason`` that only automatic dispatch
      asks (a tier that may be named explicitly but is not yet trusted to be picked,
      e.g. a kernel not yet run on its hardware).
  """

  name: str
  fn: Callable[..., Any]
  supports: Supports = _always
  priority: int = 0
  automatic: bool = True
  automatic_supports: Supports = _always


@dataclasses.dataclass(frozen=True)
class MechanismInfo:
  """What ``docs/catalog.md`` says of one mechanism (one row, generated from here).

  Attributes:
    paper: the paper (title or short citation) whose equations the reference follows.
    family: the catalog family, one of :data:`FAMILIES`.
    causal: whether a causal (decoder) form exists.
    non_causal: whether a non-causal (bidirectional / encoder) form exists.
    state: what a decoder carries per head between tokens (``"K x V"``, ``"KV cache
      (T x (K + V))"``, ...), or ``"-"`` without a decode step.
    cost: time in the sequence length T of the ``xla`` tier (``"O(T)"``, ``"O(T^2)"``,
      ``"O(T w)"``), with the per-token factor where it helps.
    step: the name of the decode-step function in ``attnlab.ops``, or None.
    xla_path: what the ``xla`` tier runs (``"chunked linear_attn"``, ``"blockwise
      softmax"``, ...): the shared path a mechanism reuses.
  """

  paper: str
  family: str
  causal: bool
  non_causal: bool
  state: str
  cost: str
  step: str | None = None
  xla_path: str = ""

  def __post_init__(self):
    if not self.xla_path:
      raise ValueError("MechanismInfo.xla_path must say what the xla tier runs")
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if not (self.causal or self.non_causal):
      raise ValueError("a mechanism needs a causal or a non-causal form")


# The families of ../shared/CATALOG.md, in its order.
FAMILIES = ("softmax", "gated linear", "feature map", "low rank", "sparse", "hybrid")

_REGISTRY: dict[str, dict[str, Implementation]] = {}
_INFO: dict[str, MechanismInfo] = {}


def describe(mechanism: str, info: MechanismInfo) -> None:
  """Record the catalog row of ``mechanism`` (once)."""
  if mechanism in _INFO:
    raise ValueError(f"{mechanism!r} is already described")
  _INFO[mechanism] = info


def info(mechanism: str) -> MechanismInfo:
  """The catalog row of a registered mechanism."""
  _tiers(mechanism)
  if mechanism not in _INFO:
    raise ValueError(f"mechanism {mechanism!r} has no MechanismInfo; call describe()")
  return _INFO[mechanism]


def register(mechanism: str, impl: Implementation) -> None:
  tiers = _REGISTRY.setdefault(mechanism, {})
  if impl.name in tiers:
    raise ValueError(f"{mechanism!r} already has an implementation named {impl.name!r}")
  tiers[impl.name] = impl


def mechanisms() -> tuple[str, ...]:
  """The registered mechanism names, sorted."""
  return tuple(sorted(_REGISTRY))


def implementations(mechanism: str) -> tuple[str, ...]:
  """The tiers of one mechanism, fastest first under automatic dispatch."""
  tiers = _tiers(mechanism)
  return tuple(sorted(tiers, key=lambda n: -tiers[n].priority))


def _tiers(mechanism: str) -> dict[str, Implementation]:
  if mechanism not in _REGISTRY:
    raise ValueError(f"unknown mechanism {mechanism!r}; registered: {mechanisms()}")
  return _REGISTRY[mechanism]


def current_backend() -> str:
  """The platform the computation runs on (``cpu``, ``gpu``, ``tpu``)."""
  return jax.default_backend()


def select(mechanism: str, implementation: str | None, call: Any) -> Implementation:
  """The tier that runs ``call``: the named one, or the fastest that supports it."""
  tiers = _tiers(mechanism)
  if implementation is not None:
    if implementation not in tiers:
      raise ValueError(
          f"implementation={implementation!r} is not a tier of {mechanism!r}; "
          f"choose one of {implementations(mechanism)} or None")
    impl = tiers[implementation]
    reason = impl.supports(call)
    if reason is not None:
      raise ValueError(f"implementation={implementation!r} cannot run this "
                       f"{mechanism} call: {reason}")
    return impl
  reasons = []
  for name in implementations(mechanism):
    impl = tiers[name]
    if not impl.automatic:
      continue
    reason = impl.supports(call) or impl.automatic_supports(call)
    if reason is None:
      return impl
    reasons.append(f"{name}: {reason}")
  raise ValueError(f"no tier of {mechanism!r} supports this call ({'; '.join(reasons)})")
