"""Softmax attention benchmark: attnlab's tiers beside jax.nn's, in one run.

Shapes follow BENCHMARKS.md: ``B * T`` tokens split over each ``T``, ``N`` query heads,
``K`` key/value heads, head dim ``H``. Every implementation is checked against the
float32 reference before it is timed.

Launch from the repository root:

  # CPU, about ten seconds (what `make run` runs):
  python -m experiments.benchmark --config=configs/benchmark.py:smoke

  # One GPU, the standard shapes (bf16, 16k tokens, N=16, H=128, T=1k/4k/16k):
  python -m experiments.benchmark --config=configs/benchmark.py --out=$OUT/results.jsonl
  # Variants: GQA (N=32, K=8) and head dim 64:
  python -m experiments.benchmark --config=configs/benchmark.py:gqa
  python -m experiments.benchmark --config=configs/benchmark.py:d64

Any field can be overridden on the command line, e.g.
``--config.seq_lens='(4096,)' --config.causal='(True,)'``.
"""

import ml_collections

VARIANTS = ("standard", "gqa", "d64", "smoke", "linear", "linear_smoke")


def get_config(arg=None):
  """The benchmark config. ``arg``: one of VARIANTS (default ``standard``)."""
  variant = arg or "standard"
  if variant not in VARIANTS:
    raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {VARIANTS}")

  config = ml_collections.ConfigDict()
  config.variant = variant
  config.family = "softmax"  # "softmax" or "linear" (the chunked linear-attention ops)
  config.seed = 0
  config.dtype = "bfloat16"
  config.tokens = 16384  # B * T, fixed across T
  config.seq_lens = (1024, 4096, 16384)
  config.num_heads = 16  # N
  config.num_kv_heads = 16  # K; N % K == 0
  config.head_dim = 128  # H
  config.causal = (True, False)
  # attnlab tiers, by registry name, and jax.nn peers ("jax_nn_<implementation>").
  config.implementations = ("xla", "cudnn", "pallas")
  # Peers: jax-linear-attention's Mosaic GPU attention where it is installed (carry its
  # wheel: ../shared/anchors/fetch_wheels.sh); jax.nn's cuDNN is attnlab's cudnn tier.
  config.peers = ("jla_mosaic_gpu",)
  # The pallas tier under masks at one length (time against the blocks each keeps).
  config.mask_seq_len = 16384
  config.mask_cases = ("causal", "window_1024", "chunked_causal_2048", "power_of_two_512",
                       "fixed_sparse_1024_128")
  # "fwd": the output; "fwdbwd": jax.grad of <o, dO> (the standard measure); the linear
  # family also takes "train": jax.value_and_grad, which must compute o as well.
  config.passes = ("fwd", "fwdbwd")

  # Timing: `warmup` untimed calls, then `reps` timed runs of `iters` calls each; the
  # reported time is the median over runs of the mean per call.
  config.warmup = 3
  config.iters = 10
  config.reps = 5

  # The correctness check runs the float32 reference on the first `check_batch` batch
  # rows and the query heads of the first key/value heads covering `check_heads` query
  # heads, so the dense [T, T] reference stays affordable at T = 16384.
  config.check_batch = 1
  config.check_heads = 2
  # Largest accepted ||out - ref|| / ||ref||, per input dtype. A result above it is
  # reported, not timed, and makes the run exit non-zero.
  config.tolerance = ml_collections.ConfigDict(
      {"float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3})

  if variant.startswith("linear"):
    config.family = "linear"
    config.linear_ops = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
    config.implementations = ("xla",)
    config.chunk_size = 64
    # The delta rules normalize q and k inside the op (use_qk_l2norm=True, as a model
    # calls them); False times them on unit-norm inputs instead, as the peers' scripts do.
    config.qk_l2norm_in_op = True
    config.copy_bandwidth = 2.97e12  # bytes/s, the H100 device copy of BENCHMARKS.md
    config.causal = ()
    config.peers = ()
    config.mask_cases = ()
  if variant == "linear_smoke":
    config.dtype = "float32"
    config.tokens = 512
    config.seq_lens = (128, 256)
    config.num_heads = 2
    config.num_kv_heads = 2
    config.head_dim = 32
    config.chunk_size = 32
    config.warmup = 1
    config.iters = 2
    config.reps = 3

  if variant == "gqa":
    config.num_heads = 32
    config.num_kv_heads = 8
  elif variant == "d64":
    config.head_dim = 64
  elif variant == "smoke":
    config.dtype = "float32"
    config.tokens = 512
    config.seq_lens = (64, 256)
    config.num_heads = 4
    config.num_kv_heads = 4
    config.head_dim = 32
    config.implementations = ("reference", "xla")
    config.peers = ("jax_nn_xla",)
    config.mask_cases = ()
    config.warmup = 1
    config.iters = 2
    config.reps = 3
  return config
