"""Mixers by name: ``make_mixer(name, config, rngs=...)`` and ``register_mixer``."""

from __future__ import annotations

from flax import nnx

from attnlab.layers import linear_mixers
from attnlab.layers.config import MixerConfig
from attnlab.layers.softmax_attention import SoftmaxAttention
from attnlab.ops import registry

_MIXERS: dict[str, type] = {}


def register_mixer(name: str, cls: type) -> None:
  """Make ``make_mixer(name, ...)`` build ``cls(config, rngs=rngs)``. ``cls.op`` names the
  op of ``attnlab.ops`` it runs (checked against the ops registry)."""
  if name in _MIXERS:
    raise ValueError(f"a mixer named {name!r} is already registered")
  if cls.op not in registry.mechanisms():
    raise ValueError(f"mixer {name!r} runs op {cls.op!r}, which is not registered; "
                     f"registered ops: {registry.mechanisms()}")
  _MIXERS[name] = cls


def mixer_names() -> tuple[str, ...]:
  return tuple(sorted(_MIXERS))


def mixer_class(name: str) -> type:
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; choose one of {mixer_names()}")
  return _MIXERS[name]


def make_mixer(name: str, config: MixerConfig, *, rngs: nnx.Rngs):
  """Build the mixer ``name`` (one of :func:`mixer_names`) from ``config``."""
  cls = mixer_class(name)
  if not isinstance(config, MixerConfig):
    raise ValueError(f"config must be a MixerConfig, got {type(config).__name__}")
  return cls(config, rngs=rngs)


for _name, _cls in (("softmax", SoftmaxAttention),
                    ("linear_attention", linear_mixers.LinearAttention),
                    ("retention", linear_mixers.Retention),
                    ("gla", linear_mixers.GLA),
                    ("simple_gla", linear_mixers.SimpleGLA),
                    ("hgrn2", linear_mixers.HGRN2),
                    ("mamba2", linear_mixers.Mamba2),
                    ("deltanet", linear_mixers.DeltaNet),
                    ("gated_deltanet", linear_mixers.GatedDeltaNet)):
  register_mixer(_name, _cls)
