"""AdamW with linear warmup, cosine decay, global-norm clipping and gradient accumulation."""

from __future__ import annotations

import jax
import optax


def decay_mask(params):
  """Weight decay on matrices only: biases, norm scales and the per-head decay
  parameters (Mamba-2's ``A_log`` and ``dt_bias``, whose shrinking toward zero would
  make a gated layer forget faster) are left alone, as in Mamba and GPT-2 training."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   clip_norm: float = 1.0, grad_accum_steps: int = 1,
                   final_lr_fraction: float = 0.1) -> optax.GradientTransformation:
  """The optimizer of a run. ``total_steps`` and ``warmup_steps`` count optimizer updates
  (each of ``grad_accum_steps`` micro-batches)."""
  if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
    raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                     f"warmup_steps={warmup_steps}, total_steps={total_steps}")
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=learning_rate * final_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                   optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                               mask=decay_mask))
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
  return tx
