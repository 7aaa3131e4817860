"""Orthodontic growth data (Potthoff & Roy, 1964), as shipped with R's nlme package.

The distance (mm) from the pituitary to the pterygomaxillary fissure for 27 children
(16 boys, 11 girls) at ages 8, 10, 12 and 14; 108 rows ordered by subject then age.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["Orthodont", "load_orthodont"]


@dataclass(frozen=True)
class Orthodont:
    """The Orthodont matrices of the NMF-RE vignette.

    Attributes
    ----------
    Y : ndarray of shape (4, 27)
        ``matrix(Orthodont$distance, 4, 27)``: rows are ages 8/10/12/14, columns subjects in
        file order.
    A : ndarray of shape (2, 27)
        ``rbind(intercept = 1, male = male)``: an intercept row and the male indicator.
    Y_rows : tuple of str
        ``("Age 8", "Age 10", "Age 12", "Age 14")``.
    Y_cols : tuple of str
        ``("S1", …, "S27")`` as in the vignette.
    A_rows : tuple of str
        ``("intercept", "male")``.
    subjects : tuple of str
        The subject codes of the data (``M01``, …, ``F11``), one per column.
    long : dict of str to ndarray
        The long table: ``distance``, ``age``, ``Subject``, ``Sex`` (108 rows).
    """

    Y: np.ndarray
    A: np.ndarray
    Y_rows: tuple
    Y_cols: tuple
    A_rows: tuple
    subjects: tuple
    long: dict

    def __iter__(self):
        """Unpack as ``Y, A, long = load_orthodont()``."""
        return iter((self.Y, self.A, self.long))

    def Y_frame(self):
        """Y as a pandas DataFrame with the vignette's dimnames."""
        import pandas as pd

        return pd.DataFrame(self.Y, index=list(self.Y_rows), columns=list(self.Y_cols))

    def A_frame(self):
        """A as a pandas DataFrame with rows ``intercept``, ``male``."""
        import pandas as pd

        return pd.DataFrame(self.A, index=list(self.A_rows), columns=list(self.Y_cols))


def load_orthodont() -> Orthodont:
    """Load Orthodont and build the vignette's Y (4 × 27) and A (2 × 27).

    Returns
    -------
    Orthodont
        Unpacks as ``Y, A, long``; see :class:`Orthodont` for the names.

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> Y, A, long = load_orthodont()
    >>> Y.shape, A.shape, int(A[1].sum())
    ((4, 27), (2, 27), 16)
    """
    text = resources.files("dnmf.datasets").joinpath("data/orthodont.csv").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = [h.strip('"') for h in lines[0].split(",")]
    rows = [[f.strip('"') for f in ln.split(",")] for ln in lines[1:]]
    cols = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    long = {
        "distance": np.array(cols["distance"], dtype=float),
        "age": np.array(cols["age"], dtype=float),
        "Subject": np.array(cols["Subject"], dtype=object),
        "Sex": np.array(cols["Sex"], dtype=object),
    }
    if long["distance"].shape[0] != 108:
        raise RuntimeError("the packaged orthodont.csv is damaged (expected 108 rows)")
    Y = long["distance"].reshape((4, 27), order="F")
    male = (long["Sex"][::4] == "Male").astype(float)
    A = np.vstack([np.ones(27), male])
    return Orthodont(
        Y=Y,
        A=A,
        Y_rows=("Age 8", "Age 10", "Age 12", "Age 14"),
        Y_cols=tuple(f"S{j + 1}" for j in range(27)),
        A_rows=("intercept", "male"),
        subjects=tuple(str(s) for s in long["Subject"][::4]),
        long=long,
    )
