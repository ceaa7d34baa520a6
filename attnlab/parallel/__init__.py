"""attnlab.parallel: sequence parallelism.

``sequence_parallel(op, mesh, axis_name)`` shards the sequence of a linear-attention op
over a mesh axis by state passing (:mod:`attnlab.parallel.linear_state_passing`);
``ring_attention(mesh, axis_name)`` and ``ulysses_attention(mesh, axis_name)`` do it for
softmax attention (:mod:`attnlab.parallel.ring`).
"""

from attnlab.parallel.linear_state_passing import sequence_parallel
from attnlab.parallel.ring import (layout_positions, ring_attention,
                                             ulysses_attention)

__all__ = ["layout_positions", "ring_attention", "sequence_parallel", "ulysses_attention"]
