"""Model-side perturbations, scoped to one run and to their branch's rows."""

from .base import BranchRows, ForwardContext, Perturbation, branch_seed
from .block_skip import BlockSkip
from .identity_attention import IdentityAttention
from .layer_skip import LayerSkipBlocks
from .query_blur import QueryBlur
from .query_shuffle import QueryShuffle
from .sparse_attention import SparseAttention
from .text_shuffle import TextShuffle
from .token_shuffle import TokenShuffle

__all__ = [
    "BlockSkip",
    "BranchRows",
    "ForwardContext",
    "IdentityAttention",
    "LayerSkipBlocks",
    "Perturbation",
    "QueryBlur",
    "QueryShuffle",
    "SparseAttention",
    "TextShuffle",
    "TokenShuffle",
    "branch_seed",
]
