"""``run(config, workdir)``: the train loop of every experiment.

``config`` (an ``ml_collections.ConfigDict``, see ``configs/``) has the blocks ``model``
(``ModelConfig`` fields), ``data`` (a source of ``attnlab.data.sources``), ``train``
(optimizer, steps, periods) and ``mesh_shape``. Metrics go to stdout (with a progress
bar on a terminal), to ``workdir/metrics.csv`` and to TensorBoard event files in
``workdir/tensorboard``; checkpoints to ``workdir/checkpoints`` (a restarted run resumes
from the newest one and continues with the same batches).
"""

from __future__ import annotations

import csv
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import models
from attnlab.data.sources import make_source
from attnlab.train import optim, sharding
from attnlab.train.checkpoint import Checkpointer
from attnlab.train.tensorboard import SummaryWriter
from attnlab.train.step import create_train_state, make_eval_step, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _mesh(config):
  shape = list(config.mesh_shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape may hold one -1 (all remaining devices), got {shape}")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = max(len(jax.devices()) // rest, 1)
  return sharding.make_mesh(shape)


def model_config(config, vocab_size) -> models.ModelConfig:
  fields = dict(config.model)
  if config.dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got dtype={config.dtype!r}")
  fields["dtype"] = DTYPES[config.dtype]
  fields["layers"] = {name: dict(spec) for name, spec in dict(fields.get("layers", {})).items()}
  return models.ModelConfig(vocab_size=vocab_size, **fields)


def _check_batch(config, mesh):
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % shards:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by the "
                     f"data x fsdp mesh axes ({shards} shards, mesh_shape="
                     f"{tuple(mesh.devices.shape)})")


class MetricsWriter:
  """One CSV row per logged step (appending on resume), the same scalars as TensorBoard
  events, and a line on stdout."""

  def __init__(self, path, tensorboard_dir=None):
    self.path = pathlib.Path(path)
    self.fields = None
    self.tensorboard = SummaryWriter(tensorboard_dir) if tensorboard_dir else None

  def write(self, row: dict, quiet: bool = False):
    if self.tensorboard is not None:
      self.tensorboard.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
    new = not self.path.exists()
    if self.fields is None:
      self.fields = list(row)
    with self.path.open("a", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
      if new:
        writer.writeheader()
      writer.writerow(row)
    if not quiet:
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()), flush=True)


class Progress:
  """A one-line progress bar on stderr, redrawn in place; only on a terminal."""

  def __init__(self, total: int, width: int = 30, enabled: bool | None = None):
    self.total, self.width = total, width
    self.enabled = sys.stderr.isatty() if enabled is None else enabled
    self.start = time.perf_counter()

  def update(self, done: int, loss: float | None = None):
    if not self.enabled:
      return
    filled = self.width * done // max(self.total, 1)
    rate = done / max(time.perf_counter() - self.start, 1e-9)
    tail = "" if loss is None else f" loss {loss:.4f}"
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}"
                     f" {rate:.1f} steps/s{tail}")
    if done == self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def evaluate(eval_step, state, source, config, mesh):
  totals, weight = {}, 0.0
  for index in range(config.train.eval_batches):
    batch = source.batch("validation", config.data.batch_size, config.seed, index)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    m = jax.device_get(eval_step(state, batch))
    w = float(m["weight"])
    for k in ("loss", "accuracy"):
      totals[k] = totals.get(k, 0.0) + float(m[k]) * w
    weight += w
  return {f"eval_{k}": v / max(weight, 1.0) for k, v in totals.items()}


def run(config, workdir, *, quiet: bool = False, stop_after: int | None = None) -> dict:
  """Train (or resume) the experiment ``config`` in ``workdir``; returns the final
  evaluation metrics, the logged train losses and the final state.

  ``stop_after``: leave after this step (a checkpoint is forced there), as a job with a
  time limit would; the next call resumes.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = _mesh(config)
  _check_batch(config, mesh)
  source = make_source(config.data)
  mcfg = model_config(config, source.vocab_size)
  t = config.train
  tx = optim.make_optimizer(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.steps,
      weight_decay=t.weight_decay, clip_norm=t.clip_norm,
      grad_accum_steps=t.grad_accum_steps)
  graph, state, shardings = create_train_state(
      lambda: models.DecoderLM(mcfg, rngs=nnx.Rngs(config.seed)), tx, mesh,
      sharding.DEFAULT_RULES)
  checkpointer = Checkpointer(workdir / "checkpoints", every=t.checkpoint_every,
                              keep=t.keep_checkpoints)
  start, state = checkpointer.restore_latest(state)
  train_step = make_train_step(graph, shardings, mesh)
  eval_step = make_eval_step(graph, shardings, mesh)
  writer = MetricsWriter(workdir / "metrics.csv", workdir / "tensorboard")
  progress = Progress(t.steps * t.grad_accum_steps, enabled=False if quiet else None)
  micro_steps = t.steps * t.grad_accum_steps
  losses, last = [], time.perf_counter()
  tokens_per_batch = config.data.batch_size * config.data.seq_len
  for step in range(start, micro_steps):
    batch = source.batch("train", config.data.batch_size, config.seed, step)
    state, metrics = train_step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    done = step + 1
    if done % t.log_every == 0 or done == micro_steps:
      m = jax.device_get(metrics)
      now = time.perf_counter()
      elapsed = (now - last) / (done - max(start, done - t.log_every))
      last = now
      row = {"step": done, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
             "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"]),
             "step_time_s": elapsed, "tokens_per_s": tokens_per_batch / elapsed}
      if t.eval_every and (done % t.eval_every == 0 or done == micro_steps):
        row.update(evaluate(eval_step, state, source, config, mesh))
      writer.write(row, quiet=quiet)
      losses.append(row["loss"])
    progress.update(done, losses[-1] if losses else None)
    checkpointer.save(done, state, force=done == stop_after)
    if done == stop_after:
      break
  checkpointer.wait()
  checkpointer.close()
  final = evaluate(eval_step, state, source, config, mesh)
  return {**final, "train_losses": losses, "state": state}
