"""attnlab.models: decoder LMs, hybrids and encoders built from ``attnlab.layers``."""

from attnlab.models.config import PAPER_PARAMS, PRESETS, ModelConfig, preset
from attnlab.models.encoder import Encoder
from attnlab.models.generate import Sampling, filter_logits, generate, sample
from attnlab.models.lm import DecoderLM

__all__ = ["PAPER_PARAMS", "PRESETS", "DecoderLM", "Encoder", "ModelConfig", "Sampling",
           "filter_logits", "generate", "preset", "sample"]
