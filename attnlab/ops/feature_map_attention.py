"""Linear attention through kernel feature maps (CATALOG.md section 3): Efficient
Attention, Performer FAVOR+, cosFormer, Cottention, linear log-normal attention, focused
linear attention (FLatten) and SLAB. (Being written.)"""

__all__ = []
