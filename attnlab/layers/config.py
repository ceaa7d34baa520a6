"""The configuration every mixer is built from, and its checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from attnlab.ops import masks as masks_lib

POSITIONS = ("rope", "none", "alibi")


@dataclasses.dataclass(frozen=True)
class MixerConfig:
  """Shapes and options of one mixer layer. Fields a mixer does not use are ignored.

  Attributes:
    width: model width D (input and output of the layer).
    num_heads: query heads (softmax) or recurrent heads (linear mixers).
    num_kv_heads: key/value heads of softmax attention (GQA/MQA); default num_heads.
    head_dim: per-head dim; default ``width // num_heads``.
    causal: decoder (True) or the non-causal / bidirectional form (False).
    dtype: compute dtype; parameters are ``param_dtype`` (float32).
    position: softmax position scheme, ``"rope"``, ``"none"`` or ``"alibi"``.
    rope_base: RoPE base frequency.
    qk_norm: RMS-normalize q and k per head before RoPE (softmax).
    output_gate: softmax: a sigmoid gate per head on the attention output (Qiu et al.
      2025, "Gated Attention for LLMs"); DeltaNet / Gated DeltaNet: the swish gate of the
      output norm, ``RMSNorm(o) * silu(x W_g)``. None = the paper's default (on for Gated
      DeltaNet, off otherwise).
    sliding_window: a query sees the last ``w`` keys, itself included (causal) or keys
      within ``w - 1`` positions (non-causal); the decode cache is a ring of ``w`` slots.
    mask: any extra static mask of ``attnlab.ops.masks`` (``ChunkedCausal(c)``,
      ``StridedSparse(s)``, ...), combined with causality and the window.
    logits_soft_cap: softmax soft cap ``c * tanh(x / c)``.
    sinks: a learned sink logit per head in each softmax denominator.
    expand_k, expand_v: key/value head dims as multiples of ``head_dim`` (linear
      mixers; None = the paper's default).
    conv_size: short causal convolution width (0 = none; None = the paper's default).
    state_size: Mamba-2's state dim N.
    dt_min, dt_max: Mamba-2 / Gated DeltaNet step-size init: ``softplus(dt_bias)`` is
      log-uniform in ``[dt_min, dt_max]``.
    a_init_range: Mamba-2 / Gated DeltaNet decay-rate init: ``-A = exp(A_log)`` uniform in
      this range. The log gate per token starts at ``-dt * (-A)``; a smaller ``dt_max`` or
      range starts the layer with a longer memory.
    mamba_expand: Mamba-2's inner width as a multiple of ``width``.
    gate_low_rank: GLA's low-rank gate projection rank.
    gate_normalizer: GLA's gate temperature (the log gate is divided by it).
    num_levels: log-linear attention's Fenwick levels L (level weights per head and
      token); documents of up to ``2^(L-1)`` tokens.
    chunk_size: chunk length of the chunked linear-attention tier.
    implementation: op tier (None = automatic dispatch).
    norm_eps: epsilon of the norms.
  """

  width: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  causal: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  position: str = "rope"
  rope_base: float = 10000.0
  qk_norm: bool = False
  output_gate: bool | None = None
  sliding_window: int | None = None
  mask: Any = None
  logits_soft_cap: float | None = None
  sinks: bool = False
  expand_k: float | None = None
  expand_v: float | None = None
  conv_size: int | None = None
  state_size: int = 64
  dt_min: float = 1e-3
  dt_max: float = 0.1
  a_init_range: tuple[float, float] = (1.0, 16.0)
  mamba_expand: int = 2
  gate_low_rank: int = 16
  gate_normalizer: float = 16.0
  num_levels: int = 16
  chunk_size: int = 64
  implementation: str | None = None
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("width", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MixerConfig.{name} must be a positive int, got {value!r}")
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f"MixerConfig.num_heads={self.num_heads} must divide "
                       f"width={self.width} (or give head_dim)")
    kv = self.kv_heads
    if kv < 1 or self.num_heads % kv:
      raise ValueError(f"MixerConfig.num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if self.position not in POSITIONS:
      raise ValueError(f"MixerConfig.position must be one of {POSITIONS}, "
                       f"got {self.position!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"MixerConfig.sliding_window must be >= 1, got {self.sliding_window}")
    if self.mask is not None and not (isinstance(self.mask, masks_lib.Mask)
                                      and self.mask.is_static):
      raise ValueError("MixerConfig.mask must be a static mask of attnlab.ops.masks "
                       f"(Causal, LocalWindow, ChunkedCausal, ...), got {self.mask!r}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"MixerConfig.dt_min, dt_max must satisfy 0 < dt_min <= dt_max, got "
                       f"{self.dt_min}, {self.dt_max}")
    object.__setattr__(self, "a_init_range", tuple(self.a_init_range))
    lo, hi = self.a_init_range
    if not 0 < lo <= hi:
      raise ValueError(f"MixerConfig.a_init_range must be (lo, hi) with 0 < lo <= hi, got "
                       f"{self.a_init_range!r}")
    if self.conv_size is not None and self.conv_size < 0:
      raise ValueError(f"MixerConfig.conv_size must be >= 0, got {self.conv_size}")

  @property
  def dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def replace(self, **changes) -> "MixerConfig":
    return dataclasses.replace(self, **changes)
