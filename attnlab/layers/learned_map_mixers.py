"""Mixers of Hedgehog, Based and TransNormer. (Being written.)"""

MIXERS = {}
