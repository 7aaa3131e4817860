"""NMF with covariates (``nmfkc``), its inference, cross-validation, and shared helpers.

Public functions: :func:`nmfkc`, :func:`nmfkc_inference`, :func:`nmfkc_ecv`, :func:`nmfkc_cv`.
"""

from .ecv import CVResult, ECVResult, nmfkc_cv, nmfkc_ecv
from .inference import NMFKCInference, nmfkc_inference
from .nmfkc import NMFKCResult, nmfkc

__all__ = [
    "NMFKCResult",
    "NMFKCInference",
    "ECVResult",
    "CVResult",
    "nmfkc",
    "nmfkc_inference",
    "nmfkc_ecv",
    "nmfkc_cv",
]
