"""Mixers of Linformer, Nystromformer and agent attention. (Being written.)"""

MIXERS = {}
