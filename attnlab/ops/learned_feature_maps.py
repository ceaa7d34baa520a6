"""Learned and polynomial feature maps: Hedgehog (and its distillation loss) and Based.
(Being written.)"""

__all__ = []
