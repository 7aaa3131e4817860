"""Orthodont for the NMF-RE tests, parsed independently of ``dnmf.datasets``."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

# nlme's Orthodont as exported from R (the copy bundled in the package; byte-identical to
# shared/data/orthodont/orthodont.csv).
ORTHODONT_CSV = pathlib.Path(__file__).resolve().parents[1] / "dnmf" / "datasets" / "data" / "orthodont.csv"


def load_orthodont_frames():
    """The vignette's Y (ages × subjects, 4 × 27) and A = [intercept; male] (2 × 27), built
    from nlme's Orthodont (long format, ordered by subject) as R's ``matrix(distance, 4, 27)``."""
    long = pd.read_csv(ORTHODONT_CSV)
    Y = pd.DataFrame(long["distance"].to_numpy(float).reshape(27, 4).T,
                     index=[f"Age {a}" for a in (8, 10, 12, 14)], columns=[f"S{i}" for i in range(1, 28)])
    male = (long["Sex"].to_numpy()[::4] == "Male").astype(float)
    A = pd.DataFrame(np.vstack([np.ones(27), male]), index=["intercept", "male"], columns=Y.columns)
    return Y, A
