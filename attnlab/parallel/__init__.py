"""attnlab.parallel: sequence parallelism.

``sequence_parallel(op, mesh, axis_name)`` shards the sequence of a linear-attention op
over a mesh axis by state passing (:mod:`attnlab.parallel.linear_state_passing`).
"""

from attnlab.parallel.linear_state_passing import sequence_parallel

__all__ = ["sequence_parallel"]
