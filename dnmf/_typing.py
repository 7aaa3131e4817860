"""Shared type aliases."""

from __future__ import annotations

from typing import Any, Union

import numpy as np

ArrayLike = Any  # numpy, scipy.sparse, pydata sparse, dask array, zarr, path
SeedLike = Union[None, int, np.random.SeedSequence, np.random.Generator]
Pair = tuple[float, float]
