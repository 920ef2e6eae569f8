"""Low-rank training: OIALR and the factored layers it uses."""

from .layers import LowRankConv, LowRankLayer, LowRankLinear
from .oialr import OIALR, compact_model, oialr_rank

__all__ = ["OIALR", "LowRankConv", "LowRankLayer", "LowRankLinear", "compact_model", "oialr_rank"]
