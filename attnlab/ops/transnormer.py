"""TransNormer ("The Devil in Linear Transformer"): NormAttention and DiagAttention.
(Being written.)"""

__all__ = []
