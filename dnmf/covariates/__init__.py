"""NMF with covariates (``nmfkc``), its inference, cross-validation, and shared helpers.

Public functions: :func:`nmfkc`, :func:`nmfkc_inference`, :func:`nmfkc_ecv`, :func:`nmfkc_cv`,
:func:`nmfkc_kernel`, :func:`nmfkc_kernel_beta_nearest_med`, :func:`nmfkc_rank`,
:func:`nmfkc_consensus`.
"""

from .consensus import ConsensusResult, nmfkc_consensus
from .ecv import CVResult, ECVResult, nmfkc_cv, nmfkc_ecv
from .inference import NMFKCInference, nmfkc_inference
from .kernel import BetaMedianResult, nmfkc_kernel, nmfkc_kernel_beta_nearest_med
from .nmfkc import NMFKCResult, nmfkc
from .rank import RankResult, nmfkc_rank

__all__ = [
    "NMFKCResult",
    "NMFKCInference",
    "ECVResult",
    "CVResult",
    "nmfkc",
    "nmfkc_inference",
    "nmfkc_ecv",
    "nmfkc_cv",
    "nmfkc_kernel",
    "nmfkc_kernel_beta_nearest_med",
    "BetaMedianResult",
    "nmfkc_rank",
    "RankResult",
    "nmfkc_consensus",
    "ConsensusResult",
]
