"""Low-rank approximations of softmax attention: Linformer and Nystromformer.
(Being written.)"""

__all__ = []
