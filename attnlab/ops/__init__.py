"""attnlab.ops: attention mechanisms as pure JAX functions, one registry, one dispatcher.

``mechanisms()`` lists the registered names, ``implementations(name)`` the tiers of one.
"""

from attnlab.ops import (agent_attention, feature_map_attention, learned_feature_maps,
                         low_rank, masks, transnormer)
from attnlab.ops import ema, ssm
from attnlab.ops import attention_rnn, softmax_variants
from attnlab.ops import multi_token_attention, selective_attention, sparse_softmax
from attnlab.ops import kda, log_linear
from attnlab.ops.agent_attention import *  # noqa: F401,F403  (their __all__)
from attnlab.ops.feature_map_attention import *  # noqa: F401,F403
from attnlab.ops.learned_feature_maps import *  # noqa: F401,F403
from attnlab.ops.low_rank import *  # noqa: F401,F403
from attnlab.ops.transnormer import *  # noqa: F401,F403
from attnlab.ops.ssm import *  # noqa: F401,F403
from attnlab.ops.ema import *  # noqa: F401,F403
from attnlab.ops.attention_rnn import *  # noqa: F401,F403
from attnlab.ops.softmax_variants import *  # noqa: F401,F403
from attnlab.ops.sparse_softmax import *  # noqa: F401,F403
from attnlab.ops.selective_attention import *  # noqa: F401,F403
from attnlab.ops.multi_token_attention import *  # noqa: F401,F403
from attnlab.ops.kda import *  # noqa: F401,F403
from attnlab.ops.log_linear import *  # noqa: F401,F403
from attnlab.ops.linear_attention import (delta_rule, delta_rule_step, gated_delta_rule,
                                          gated_delta_rule_step, gla, gla_step,
                                          linear_attn, linear_attn_step, retention,
                                          retention_gammas, retention_step, simple_gla,
                                          simple_gla_step)
from attnlab.ops.registry import implementations, mechanisms
from attnlab.ops.softmax import dot_product_attention
from attnlab.ops.softmax_xla import BlockSizes

__all__ = [
    "BlockSizes", "delta_rule", "delta_rule_step", "dot_product_attention",
    "gated_delta_rule", "gated_delta_rule_step", "gla", "gla_step", "implementations",
    "linear_attn", "linear_attn_step", "masks", "mechanisms", "retention",
    "retention_gammas", "retention_step", "simple_gla", "simple_gla_step",
] + [name for module in (agent_attention, feature_map_attention, learned_feature_maps,
                         low_rank, transnormer, ssm, ema, attention_rnn,
                         softmax_variants, sparse_softmax, selective_attention,
                         multi_token_attention, kda, log_linear)
    for name in module.__all__]
