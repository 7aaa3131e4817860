"""nmfkc print / summary / plot / coef, the "Call:" line, R's defaults (seed, detail), formula
mode, and the DOT print hint (spec nmfre.md §2, §7.2–7.3, §8)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import dnmf
from dnmf import nmfkc, nmfkc_inference
from dnmf.covariates._text import r_format
from dnmf.exceptions import ConvergenceWarning, InputError
from dnmf.formula import parse_formula

from orthodont_data import load_orthodont_frames

FORMULA = "age8 + age10 + age12 + age14 ~ intercept + male"


@pytest.fixture(scope="module")
def frames():
    return load_orthodont_frames()


@pytest.fixture(scope="module")
def wide(frames):
    """Orthodont with one row per subject: the four ages, an intercept column and male."""
    Y, A = frames
    return pd.concat([Y.T.set_axis(["age8", "age10", "age12", "age14"], axis=1), A.T], axis=1)


@pytest.fixture(scope="module")
def fit1(frames):
    Y, A = frames
    return nmfkc(Y, A, rank=1)


# ------------------------------------------------------------------------- print / summary


def test_print_is_r_print_nmf(fit1):
    # R: print.nmf (.print.nmf.fit + hint); R² = format(0.41653, digits=4)
    assert str(fit1) == "\n".join([
        "",
        "Call:",
        "nmfkc(Y = Y, A = A, rank = 1)",
        "",
        "Model:       Y(4,27)~X(4,1)C(1,2)A(2,27)=XB(1,27)",
        "Convergence: 76 / 5000 (converged)  epsilon = 0.0001",
        "R-squared:   0.4165",
        "",
        "Use coef() for the coefficient matrix, summary() for diagnostics.",
        "",
    ])
    assert repr(fit1) == str(fit1)


def test_summary_text(fit1):
    lines = fit1.summary().split("\n")
    assert lines[:4] == ["", "Call:", "nmfkc(Y = Y, A = A, rank = 1)", ""]
    assert lines[4] == "Dimensions: Y(4,27)~X(4,1)C(1,2)A(2,27)=XB(1,27) "
    assert lines[5] == "Rank (Q):    1 "
    assert lines[7] == "Method:      EU "
    assert lines[8] == "Iterations: 76 / 5000 (converged)  epsilon = 0.0001"
    assert lines[9] == "Missing:     0 (0.0%) "
    # spec §2: objective 535.8, cor² 0.4165, sigma 2.238, MAE 1.766 (R's 4 significant digits)
    assert "  Objective function:   535.8 " in lines
    assert "  R-squared (cor^2):    0.4165 " in lines
    assert "  Residual Std Error:   2.238 " in lines
    assert "  Mean Absolute Error:  1.766 " in lines
    assert "Structure Diagnostics:" in lines
    assert "  Clustering Crispness:  1 (range: 0-1, closer to 1 is better)" in lines
    assert lines[-1] == ""


def test_summary_effective_rank_line():
    rng = np.random.default_rng(0)
    Y = rng.random((6, 30))
    f = nmfkc(Y, rank=3, seed=1)
    line = [s for s in f.summary().split("\n") if s.startswith("  Effective Rank:")]
    assert line == [f"  Effective Rank:      {f.criterion['effective_rank']:.2f} / 3"]


def test_not_converged_convergence_line():
    rng = np.random.default_rng(1)
    with pytest.warns(ConvergenceWarning):
        f = nmfkc(rng.random((5, 12)), rank=2, maxit=3)
    assert "Convergence: 3 / 3 (NOT converged)  epsilon = 0.0001" in str(f)
    assert "nmfkc(Y = Y, rank = 2, maxit = 3)" in str(f)


def test_call_lists_given_arguments():
    rng = np.random.default_rng(2)
    Y = rng.random((4, 10))
    f = nmfkc(Y, rank=2, epsilon=1e-6, X_init="runif", prefix="F", detail="full", r_rng=True)
    assert f.call == 'nmfkc(Y = Y, rank = 2, epsilon = 1e-06, X_init = "runif", prefix = "F", detail = "full", r_rng = TRUE)'
    assert nmfkc(Y).call == "nmfkc(Y = Y)"  # defaults are not part of the call, as in R


def test_r_format_digits():
    # R 4.x: format(x, digits=4)
    assert r_format(0.41653, 4) == "0.4165"
    assert r_format(0.5, 4) == "0.5"
    assert r_format(535.7777, 4) == "535.8"
    assert r_format(123456.7, 4) == "123457"
    assert r_format(1.234e-7, 4) == "1.234e-07"
    assert r_format(1.0, 4) == "1"


def test_coef_and_plot(fit1):
    np.testing.assert_array_equal(fit1.coef(), fit1.C)
    fig = fit1.plot()
    ax = fig.axes[0]
    assert ax.get_title() == f"r.squared={round(fit1.r_squared, 3)}" == "r.squared=0.416"  # cor² = 0.41648…
    assert ax.get_xlabel() == "iter" and ax.get_ylabel() == "objfunc"
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), fit1.objfunc_iter)
    assert len(fit1.objfunc_iter) == 76 - 9  # R trims to iterations 10..end


def test_inference_prints_and_summary_has_call(fit1, frames):
    Y, A = frames
    inf = nmfkc_inference(fit1, Y, A, wild_bootstrap=False)
    text = str(inf)
    assert text.startswith("\nCall:\nnmfkc(Y = Y, A = A, rank = 1)\n")
    assert "Model:" in text and "Convergence:" in text and len(text.split("\n")) <= 15  # upstream pin
    assert inf.summary().split("\n")[:4] == ["", "Call:", "nmfkc(Y = Y, A = A, rank = 1)", ""]
    assert inf.coef() is inf.coefficients


# ------------------------------------------------------------------------------- defaults


def test_seed_none_is_r_default(frames):
    Y, _ = frames
    a = nmfkc(Y, rank=2, seed=None, X_init="runif")
    b = nmfkc(Y, rank=2, X_init="runif")
    np.testing.assert_array_equal(a.X, b.X)
    assert a.seed == 123


def test_detail_default_is_fast(fit1):
    # upstream HEAD: detail = "fast" (no silhouette / CPCC / dist.cor)
    import inspect

    assert inspect.signature(nmfkc).parameters["detail"].default == "fast"
    assert "silhouette" not in fit1.criterion or not np.isfinite(fit1.criterion.get("silhouette", np.nan))


def test_Q_alias(frames):
    Y, A = frames
    f = nmfkc(Y, A, Q=1)
    np.testing.assert_array_equal(f.C, nmfkc(Y, A, rank=1).C)
    assert f.rank == 1
    g = dnmf.nmfre(Y, A, Q=1, df_rate=0.2, wild_bootstrap=False)
    assert g.shape[2] == 1


# ------------------------------------------------------------------------------ formula mode


def test_formula_equals_matrix_call(frames, wide, fit1):
    f = nmfkc(FORMULA, data=wide, rank=1)
    np.testing.assert_array_equal(f.X, fit1.X)
    np.testing.assert_array_equal(f.C, fit1.C)
    assert f.n_iter == 76
    assert f.formula_meta == {"formula": FORMULA, "Y_cols": ("age8", "age10", "age12", "age14"),
                              "A_cols": ("intercept", "male")}
    assert f.covariate_names == ("intercept", "male")
    assert f.feature_names == ("age8", "age10", "age12", "age14")
    assert f.call == f"nmfkc(Y = {FORMULA}, rank = 1, data = data)"  # match.call: formals order
    assert f"Formula:     {FORMULA}" in str(f).split("\n")
    np.testing.assert_allclose(f.predict(newdata=wide.iloc[:3]), fit1.predict(frames[1].to_numpy()[:, :3]))


def test_formula_nmfre_equals_matrix_call(frames, wide):
    Y, A = frames
    a = dnmf.nmfre(Y, A, rank=1, df_rate=0.2, wild_bootstrap=False)
    b = dnmf.nmfre("age8+age10+age12+age14 ~ intercept+male", data=wide, rank=1, df_rate=0.2, wild_bootstrap=False)
    np.testing.assert_array_equal(a.C, b.C)
    np.testing.assert_array_equal(a.U, b.U)
    assert b.formula_meta["A_cols"] == ("intercept", "male")
    assert b.call.startswith(f"nmfre('{FORMULA}', data=data, rank=1")


def test_formula_dot_and_omitted_A(wide, fit1):
    f = nmfkc(". ~ intercept + male", data=wide, rank=1)
    np.testing.assert_array_equal(f.C, fit1.C)
    g = nmfkc("age8 + age10 + age12 + age14 ~ 0", data=wide, rank=1)
    assert g.formula_meta["A_cols"] is None and not g.has_A
    np.testing.assert_array_equal(g.X, nmfkc(wide[["age8", "age10", "age12", "age14"]].T, rank=1).X)
    cols = ["y1", "y2", "x1", "x2"]
    assert parse_formula("y1 + y2 ~ .", cols, "t") == (["y1", "y2"], ["x1", "x2"])
    assert parse_formula("y1 ~ x1 + 0", cols, "t") == (["y1"], ["x1"])
    assert parse_formula("y1 + y2 ~ -1", cols, "t") == (["y1", "y2"], None)


def test_formula_errors(wide):
    with pytest.raises(InputError, match="not found in data: nope"):
        nmfkc("age8 ~ nope", data=wide)
    with pytest.raises(InputError, match="both"):
        nmfkc(". ~ .", data=wide)
    with pytest.raises(InputError, match="data"):
        nmfkc("age8 ~ male")
    with pytest.raises(InputError, match="formula"):
        nmfkc(wide.to_numpy().T, data=wide)


# ------------------------------------------------------------------------------------ DOT


def test_dot_repr_has_print_hint(fit1):
    g = dnmf.nmfkc_dot(fit1)
    assert repr(g) == str(g) + "# Use .render(path) to render (requires Graphviz), or .save(path) to write this text to a .dot file.\n"
    assert str(g).endswith("}\n")
