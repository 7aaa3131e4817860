"""NMF with random effects (NMF-RE): ``Y = X(ΘA + U) + E`` (spec/nmfre.md).

* :func:`nmfre` — fit (engine ``"cap"``: df-cap, the 2026-03 design; ``"ecm"``: current upstream).
* :func:`nmfre_dfu_scan` — refit the df-cap engine over df rates and pick one.
* :func:`nmfre_inference` — sandwich SE, z, p and the wild bootstrap for Θ.
* :func:`nmfre_ecv` — element-wise cross-validation of the rank.
* :func:`nmfre_blocked` — the df-cap engine on a column-blocked Y through a Dask cluster.
* :func:`choose_rate`, :data:`DEFAULT_RATES` — the scan's automatic rule and default rates
  (for pipelines that run the scan themselves).

The submodules load on first use of one of their names (PEP 562), so ``import dnmf.mixed``
(and a pipeline that imports only :mod:`dnmf.mixed.scan`) does not pull in SciPy's statistics
or the numba kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and readers; loaded lazily below
    from ._core import DEFAULT_RATES
    from .blocks import NMFREBlockedResult, nmfre_blocked
    from .ecv import NMFREECVResult, nmfre_ecv
    from .inference import nmfre_inference
    from .nmfre import NMFREResult, nmfre
    from .scan import DfUScanResult, choose_rate, nmfre_dfu_scan

#: public name -> submodule that defines it
_LAZY = {
    "nmfre": "nmfre",
    "NMFREResult": "nmfre",
    "nmfre_dfu_scan": "scan",
    "DfUScanResult": "scan",
    "choose_rate": "scan",
    "DEFAULT_RATES": "_core",
    "nmfre_inference": "inference",
    "nmfre_ecv": "ecv",
    "NMFREECVResult": "ecv",
    "nmfre_blocked": "blocks",
    "NMFREBlockedResult": "blocks",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
