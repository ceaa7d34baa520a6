"""Model configuration: sizes, the layer pattern of hybrids, per-layer mixer configs, and
named presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from attnlab.layers import MixerConfig, mixer_names

# GPT-3's shapes (Brown et al. 2020, Table 2.1), reused as the 125M / 350M / 1.3B sizes of
# the linear-attention papers (GLA, DeltaNet, Gated DeltaNet compare at these sizes), with
# the GPT-2 vocabulary and tied embeddings. PAPER_PARAMS are the published counts.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, width=64, num_layers=2, num_heads=4),
    "125M": dict(vocab_size=50257, width=768, num_layers=12, num_heads=12),
    "350M": dict(vocab_size=50257, width=1024, num_layers=24, num_heads=16),
    "1.3B": dict(vocab_size=50257, width=2048, num_layers=24, num_heads=16),
}
PAPER_PARAMS = {"125M": 125e6, "350M": 350e6, "1.3B": 1.3e9}

_MIXER_FIELDS = {f.name for f in dataclasses.fields(MixerConfig)}
# Model fields every mixer inherits; a layer may override those not in _FIXED.
_SHARED = ("width", "num_heads", "num_kv_heads", "head_dim", "causal", "dtype",
           "param_dtype", "chunk_size", "implementation", "norm_eps")
_FIXED = ("width", "causal", "dtype", "param_dtype")


def _round_up(x, multiple):
  return -(-int(x) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder LM or encoder built from pre-norm residual blocks (mixer + SwiGLU MLP).

  Attributes:
    vocab_size, width, num_layers, num_heads, num_kv_heads, head_dim: sizes.
    mlp_dim: SwiGLU hidden width; default ``8/3 * width`` rounded up to 64 (the
      parameter count of a 4x GELU MLP).
    pattern: layer names repeated to fill ``num_layers`` (its length must divide it),
      e.g. ``("gated_deltanet",) * 3 + ("softmax",)``. A name is a key of ``layers`` or
      a mixer name (``attnlab.layers.mixer_names()``).
    layers: per-layer configs: name -> ``{"mixer": <mixer name>, <MixerConfig field>:
      value, ...}``, e.g. ``{"local": {"mixer": "softmax", "sliding_window": 512}}``.
    tie_embeddings: the LM head reuses the embedding matrix.
    remat: rematerialize each pattern repeat in the backward pass.
    scan_layers: stack the pattern repeats and run them with ``nnx.scan`` (one compiled
      repeat instead of ``num_layers`` unrolled blocks).
    causal: decoder (True) or bidirectional encoder (False).
    num_classes: the encoder's classification head size.
  """

  vocab_size: int = 256
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  pattern: tuple[str, ...] = ("softmax",)
  layers: Mapping[str, Mapping[str, Any]] = ()
  tie_embeddings: bool = True
  remat: bool = False
  scan_layers: bool = False
  causal: bool = True
  num_classes: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  chunk_size: int = 64
  implementation: str | None = None
  norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "pattern", tuple(self.pattern))
    # Stored as sorted tuples so the config hashes (jit treats modules' configs as static).
    layers = dict(self.layers)
    object.__setattr__(self, "layers", tuple(
        (name, tuple(sorted(dict(spec).items()))) for name, spec in sorted(layers.items())))
    for name in ("vocab_size", "width", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must divide "
                       f"width={self.width} (or give head_dim)")
    if not self.pattern:
      raise ValueError("ModelConfig.pattern must name at least one layer")
    if self.num_layers % len(self.pattern):
      raise ValueError(f"ModelConfig.num_layers={self.num_layers} must be a multiple of "
                       f"len(pattern)={len(self.pattern)} (pattern={self.pattern})")
    for name, spec in self.layer_configs().items():
      if "mixer" not in spec or spec["mixer"] not in mixer_names():
        raise ValueError(f"ModelConfig.layers[{name!r}] must name a mixer, one of "
                         f"{mixer_names()}; got {dict(spec)}")
      unknown = set(spec) - _MIXER_FIELDS - {"mixer"} | (set(spec) & set(_FIXED))
      if unknown:
        raise ValueError(f"ModelConfig.layers[{name!r}] has fields {sorted(unknown)} that "
                         f"a layer cannot set; allowed: "
                         f"{sorted(_MIXER_FIELDS - set(_FIXED))}")
    allowed = tuple(self.layer_configs()) + mixer_names()
    for name in self.pattern:
      if name not in allowed:
        raise ValueError(f"ModelConfig.pattern names an unknown layer {name!r}; allowed: "
                         f"layers {tuple(self.layer_configs())} or mixers {mixer_names()}")
    for spec in self.layer_configs().values():
      self._mixer(spec)  # builds every MixerConfig now, so their checks run here
    self.layer_specs()

  def layer_configs(self) -> dict[str, dict[str, Any]]:
    """``layers`` as a dict of dicts."""
    return {name: dict(spec) for name, spec in self.layers}

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or _round_up(8 * self.width / 3, 64)

  @property
  def num_repeats(self) -> int:
    return self.num_layers // len(self.pattern)

  def _mixer(self, spec) -> tuple[str, MixerConfig]:
    spec = dict(spec)
    mixer = spec.pop("mixer")
    shared = {name: getattr(self, name) for name in _SHARED}
    return mixer, MixerConfig(**{**shared, **spec})

  def layer_specs(self) -> list[tuple[str, MixerConfig]]:
    """``(mixer name, MixerConfig)`` for each entry of the pattern."""
    layers = self.layer_configs()
    return [self._mixer(layers.get(entry, {"mixer": entry})) for entry in self.pattern]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def preset(name: str, **overrides) -> ModelConfig:
  """A named size (``tiny``, ``125M``, ``350M``, ``1.3B``) with any field overridden."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
