"""attnlab.ops: attention mechanisms as pure JAX functions, one registry, one dispatcher.

``mechanisms()`` lists the registered names, ``implementations(name)`` the tiers of one.
"""

from attnlab.ops import masks
from attnlab.ops.registry import implementations, mechanisms
from attnlab.ops.softmax import dot_product_attention
from attnlab.ops.softmax_xla import BlockSizes

__all__ = ["BlockSizes", "dot_product_attention", "implementations", "masks", "mechanisms"]
