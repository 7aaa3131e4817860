"""NMF with random effects (NMF-RE): ``Y = X(ΘA + U) + E`` (spec/nmfre.md).

* :func:`nmfre` — fit (engine ``"cap"``: df-cap, the 2026-03 design; ``"ecm"``: current upstream).
* :func:`nmfre_dfu_scan` — refit the df-cap engine over df rates and pick one.
* :func:`nmfre_inference` — sandwich SE, z, p and the wild bootstrap for Θ.
* :func:`nmfre_ecv` — element-wise cross-validation of the rank.
* :func:`nmfre_blocked` — the df-cap engine on a column-blocked Y through a Dask cluster.
* :func:`choose_rate`, :data:`DEFAULT_RATES` — the scan's automatic rule and default rates
  (for pipelines that run the scan themselves).
"""

from ._core import DEFAULT_RATES
from .blocks import NMFREBlockedResult, nmfre_blocked
from .ecv import NMFREECVResult, nmfre_ecv
from .inference import nmfre_inference
from .nmfre import NMFREResult, nmfre
from .scan import DfUScanResult, choose_rate, nmfre_dfu_scan

__all__ = [
    "nmfre",
    "NMFREResult",
    "nmfre_dfu_scan",
    "DfUScanResult",
    "choose_rate",
    "DEFAULT_RATES",
    "nmfre_inference",
    "nmfre_ecv",
    "NMFREECVResult",
    "nmfre_blocked",
    "NMFREBlockedResult",
]
