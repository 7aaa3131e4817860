"""Small reference data sets shipped with dnmf.

* :func:`load_pbmc3k`, :func:`load_hawaiibirds`, :func:`load_aml` — RcppML 1.0's bundled
  matrices as a :class:`Dataset` (``X`` features × samples, ``obs``, ``var``);
* :func:`load_orthodont` — the NMF-RE vignette's Orthodont matrices.
"""

from .matrices import Dataset, load_aml, load_hawaiibirds, load_pbmc3k
from .orthodont import Orthodont, load_orthodont

__all__ = ["Dataset", "load_pbmc3k", "load_hawaiibirds", "load_aml", "Orthodont", "load_orthodont"]
