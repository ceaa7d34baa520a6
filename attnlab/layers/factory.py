"""Mixers by name: ``make_mixer(name, config, rngs=...)`` and ``register_mixer``."""

from __future__ import annotations

from flax import nnx

from attnlab.layers import (feature_map_mixers, learned_map_mixers, linear_mixers,
                            low_rank_mixers, recurrence_mixers, score_variant_mixers,
                            softmax_variant_mixers, ssm_mixers)
from attnlab.layers.config import MixerConfig
from attnlab.layers.softmax_attention import SoftmaxAttention
from attnlab.ops import registry

_MIXERS: dict[str, type] = {}


FORMS = ("causal", "non_causal")


def register_mixer(name: str, cls: type) -> None:
  """Make ``make_mixer(name, ...)`` build ``cls(config, rngs=rngs)``.

  ``cls.op`` names the op of ``attnlab.ops`` it runs (or ``cls.ops``, a tuple, when it
  runs several), checked against the ops registry; ``cls.forms`` (default both) says
  whether it has a ``"causal"`` form (with ``prefill`` / ``decode``), a ``"non_causal"``
  one, or both. Building a form it lacks raises ``ValueError``."""
  if name in _MIXERS:
    raise ValueError(f"a mixer named {name!r} is already registered")
  for op in mixer_ops(cls):
    if op not in registry.mechanisms():
      raise ValueError(f"mixer {name!r} runs op {op!r}, which is not registered; "
                       f"registered ops: {registry.mechanisms()}")
  forms = mixer_forms(cls)
  if not forms or set(forms) - set(FORMS):
    raise ValueError(f"mixer {name!r} has forms={forms!r}; each must be one of {FORMS}")
  _MIXERS[name] = cls


def mixer_ops(cls) -> tuple[str, ...]:
  """The ops of ``attnlab.ops`` a mixer class runs: ``cls.ops`` or ``(cls.op,)``."""
  return tuple(cls.ops) if hasattr(cls, "ops") else (cls.op,)


def mixer_forms(cls) -> tuple[str, ...]:
  """The forms a mixer class has: ``"causal"``, ``"non_causal"`` or both."""
  return tuple(getattr(cls, "forms", FORMS))


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
  form = "causal" if config.causal else "non_causal"
  if form not in mixer_forms(cls):
    raise ValueError(f"mixer {name!r} has no {form} form (MixerConfig.causal="
                     f"{config.causal}); its forms: {mixer_forms(cls)}")
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

# The catalog's wider mechanisms: each module lists its mixers in ``MIXERS``.
for _module in (feature_map_mixers, learned_map_mixers, low_rank_mixers,
                softmax_variant_mixers, score_variant_mixers, ssm_mixers, recurrence_mixers):
  for _name, _cls in _module.MIXERS.items():
    register_mixer(_name, _cls)
