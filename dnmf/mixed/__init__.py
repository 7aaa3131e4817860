"""NMF with random effects (NMF-RE): ``Y = X(ΘA + U) + E`` (spec/nmfre.md).

* :func:`nmfre` — fit (engine ``"cap"``: df-cap, the 2026-03 design; ``"ecm"``: current upstream).
* :func:`nmfre_dfu_scan` — refit the df-cap engine over df rates and pick one.
* :func:`nmfre_inference` — sandwich SE, z, p and the wild bootstrap for Θ.
* :func:`nmfre_ecv` — element-wise cross-validation of the rank.
* :func:`nmfre_blocked` — the df-cap engine on a column-blocked Y through a Dask cluster.
"""

from .blocks import NMFREBlockedResult, nmfre_blocked
from .ecv import NMFREECVResult, nmfre_ecv
from .inference import nmfre_inference
from .nmfre import NMFREResult, nmfre
from .scan import DfUScanResult, nmfre_dfu_scan

__all__ = [
    "nmfre",
    "NMFREResult",
    "nmfre_dfu_scan",
    "DfUScanResult",
    "nmfre_inference",
    "nmfre_ecv",
    "NMFREECVResult",
    "nmfre_blocked",
    "NMFREBlockedResult",
]
