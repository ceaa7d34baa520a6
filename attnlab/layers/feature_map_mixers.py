"""Mixers of the feature-map linear attentions. (Being written.)"""

MIXERS = {}
