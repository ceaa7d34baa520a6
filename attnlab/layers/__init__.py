"""attnlab.layers: Flax NNX mixers that call ``attnlab.ops`` by name.

Every mixer maps ``x [B, T, D] -> [B, T, D]`` and supports ``prefill`` / ``decode`` with
a cache; :func:`make_mixer` builds one by name from a :class:`MixerConfig`.
"""

from attnlab.layers.common import LOGICAL_AXES, RMSNorm, ShortConv, rope
from attnlab.layers.config import MixerConfig
from attnlab.layers.factory import (make_mixer, mixer_class, mixer_forms, mixer_names,
                                    mixer_ops, register_mixer)
from attnlab.layers.linear_mixers import (GLA, HGRN2, DeltaNet, GatedDeltaNet,
                                          LinearAttention, Mamba2, Retention, SimpleGLA)
from attnlab.layers.recurrent_base import RecurrentMixer
from attnlab.layers.softmax_attention import SoftmaxAttention

__all__ = [
    "GLA", "HGRN2", "LOGICAL_AXES", "DeltaNet", "GatedDeltaNet", "LinearAttention",
    "Mamba2", "MixerConfig", "RMSNorm", "RecurrentMixer", "Retention", "ShortConv",
    "SimpleGLA", "SoftmaxAttention", "make_mixer", "mixer_class", "mixer_forms", "mixer_names", "mixer_ops",
    "register_mixer", "rope",
]
