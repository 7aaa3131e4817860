"""NMF with random effects (NMF-RE): ``Y = X(ΘA + U) + E`` (spec/nmfre.md).

* :func:`nmfre` — fit (engine ``"cap"``: df-cap, the 2026-03 design; ``"ecm"``: current upstream).
* :func:`nmfre_dfu_scan` — refit the df-cap engine over df rates and pick one.
* :func:`nmfre_inference` — sandwich SE, z, p and the wild bootstrap for Θ.
* :func:`nmfre_ecv` — element-wise cross-validation of the rank.
* :func:`nmfre_blocked` — the df-cap engine on a column-blocked Y through a Dask cluster.
* :func:`choose_rate`, :data:`DEFAULT_RATES` — the scan's automatic rule and default rates
  (for pipelines that run the scan themselves).
"""

import importlib

from ._core import DEFAULT_RATES
from .nmfre import NMFREResult, nmfre  # eager: the function ``nmfre`` shadows its module here

# name -> submodule that defines it, imported on first access: the blocked fit (Dask, Zarr,
# numba) and the inference (scipy.stats) stay out of `import dnmf.mixed.nmfre`.
_LAZY = {
    "NMFREBlockedResult": "blocks",
    "nmfre_blocked": "blocks",
    "NMFREECVResult": "ecv",
    "nmfre_ecv": "ecv",
    "nmfre_inference": "inference",
    "DfUScanResult": "scan",
    "choose_rate": "scan",
    "nmfre_dfu_scan": "scan",
}

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
