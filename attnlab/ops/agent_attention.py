"""Agent attention: two softmax attentions through A agent tokens. (Being written.)"""

__all__ = []
