"""One declaration per parameter (dnmf.params): nmf, the estimator and the YAML section agree with it."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import numpy as np
import pytest
from sklearn.base import BaseEstimator

import dnmf
from dnmf import params as P
from dnmf.config import build_section, describe_section
from dnmf.exceptions import ConfigError, InputError


def _factorize_model():
    from dnmf.config import get_pipeline

    return get_pipeline("factorize").SECTIONS["model"]


def _sig(fn) -> list[tuple]:
    sig = fn if isinstance(fn, inspect.Signature) else inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_nmf_signature_is_the_spec():
    assert _sig(dnmf.nmf) == _sig(P.signature(P.NMF_PARAMS))


def test_docstrings_document_every_parameter():
    for p in P.NMF_PARAMS:
        assert p.name in dnmf.nmf.__doc__, p.name
        if p.estimator:
            assert p.estimator_name in dnmf.NMF.__doc__, p.estimator_name


def test_estimator_parameters_are_the_spec():
    expected = {p.alias or p.name: (p.default if p.estimator_default is P._SAME else p.estimator_default)
                for p in P.NMF_PARAMS if p.estimator}
    assert dnmf.NMF().get_params(deep=False) == expected
    assert list(inspect.signature(dnmf.NMF).parameters)[0] == "n_components"  # the one positional
    assert set(expected) >= {"n_components", "max_iter", "random_state", "tol", "L1", "block_nnz"}


def test_yaml_model_section_is_the_spec():
    Model = _factorize_model()
    got = {f.name: f.default for f in dataclasses.fields(Model)}
    expected = {p.name: (p.default if p.config_default is P._SAME else p.config_default)
                for p in P.NMF_PARAMS if p.config}
    expected["k"] = dataclasses.MISSING
    assert got == expected
    lines = describe_section(Model, "model")
    for p in P.NMF_PARAMS:
        if p.config:
            assert any(line.startswith(f"model.{p.name}: ") and line.endswith(f" — {p.doc}") for line in lines)
    # the library's range of L1 (RcppML's [0, 1)) is the config's
    assert any(line.startswith("model.L1: a float in [0.0, 1.0)") for line in lines)
    with pytest.raises(ConfigError, match=r"The config key 'model.L1' must be a float in \[0\.0, 1\.0\)"):
        build_section(Model, {"k": 2, "L1": 1.0}, "model")
    # YAML values reach nmf under nmf's names, with nmf's meaning of "auto" / "random"
    cfg = build_section(Model, {"k": 2, "L1": 0.5, "init": "svd"}, "model")
    kwargs = P.config_kwargs(P.NMF_PARAMS, cfg)
    assert kwargs["L1"] == (0.5, 0.5) and kwargs["out_of_core"] is None and kwargs["init"] == "svd"
    assert set(kwargs) == {p.name for p in P.NMF_PARAMS if p.config}


def test_a_new_parameter_appears_in_all_three_dialects():
    """Building from a table with one more entry: nmf's signature, the estimator and the YAML section get it."""
    dummy = P.Param("damping", P.Interval(float, low=0.0, high=1.0, high_open=True), 0.5, "a new knob",
                    alias="damping_factor")
    spec = (*P.NMF_PARAMS, dummy)

    sig = P.signature(spec)
    assert sig.parameters["damping"].default == 0.5
    assert sig.parameters["damping"].kind is inspect.Parameter.KEYWORD_ONLY

    class Est(BaseEstimator):
        __init__ = P.estimator_init(spec)

    est = Est(3, damping_factor=0.25)
    assert est.get_params()["damping_factor"] == 0.25 and Est().get_params()["damping_factor"] == 0.5
    assert est.n_components == 3 and P.estimator_kwargs(spec, est)["damping"] == 0.25

    Model = P.config_section(spec, "Model")
    assert {f.name: f.default for f in dataclasses.fields(Model)}["damping"] == 0.5
    assert "model.damping: a float in [0.0, 1.0) (default 0.5) — a new knob" in describe_section(Model, "model")
    assert P.config_kwargs(spec, build_section(Model, {"k": 2, "damping": 0.1}, "model"))["damping"] == 0.1
    with pytest.raises(ConfigError, match=r"'model.damping' must be a float in \[0\.0, 1\.0\)"):
        build_section(Model, {"k": 2, "damping": 1}, "model")

    values = {p.name: p.default for p in spec} | {"k": 2, "damping": 2.0}
    with pytest.raises(InputError, match=r"^The 'damping' parameter of nmf must be a float in \[0\.0, 1\.0\)\. "
                                         r"Got 2\.0 instead\.$"):
        P.validate(spec, values, "nmf")


def test_every_dialect_speaks_the_one_template():
    A = dnmf.simulate_nmf(20, 15, 2, seed=0).A
    with pytest.raises(InputError, match=r"^The 'tol' parameter of nmf must be a float in \[0\.0, inf\)\. "
                                         r"Got -1 instead\.$"):
        dnmf.nmf(A, 2, tol=-1)
    with pytest.raises(InputError, match=r"^The 'max_iter' parameter of NMF\.fit must be an int in \[1, inf\]\. "
                                         r"Got 0 instead\.$"):
        dnmf.NMF(2, max_iter=0, client=False).fit(A.T)
    with pytest.raises(InputError, match=r"^The 'L1' parameter of NMF\.fit must be a float in \[0\.0, 1\.0\)"):
        dnmf.NMF(2, L1=1.0, client=False).fit(A.T)
    with pytest.raises(InputError, match="'resume' parameter of nmf must be False unless 'checkpoint' is given"):
        dnmf.nmf(A, 2, resume=True)
    with pytest.raises(InputError, match="'seed' parameter of nmf must be None, a non-negative int"):
        dnmf.nmf(A, 2, seed=-3)


def test_misc_is_a_read_only_view_of_the_frozen_fit_record():
    from dnmf.core import NMFFitRecord

    model = dnmf.nmf(dnmf.simulate_nmf(30, 20, 2, seed=1).A, 2, seed=1, maxit=5, client=False)
    misc = model.misc
    assert isinstance(misc.record, NMFFitRecord)
    assert misc["iter"] == misc.record.iter == 5 and misc["seed"] == 1 and "loss_history" in misc
    assert set(misc) == {f.name for f in dataclasses.fields(NMFFitRecord)}
    with pytest.raises(TypeError):
        misc["iter"] = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        misc.record.iter = 3
    copy = dict(misc)
    copy["extra"] = 1  # a plain dict copy is the user's to change
    back = pickle.loads(pickle.dumps(model))
    assert back.misc["iter"] == 5
    np.testing.assert_array_equal(back.misc["loss_history"], misc["loss_history"])


# ---------------------------------------------------------------------------------------------
# nmfre: one table for the function, its checks and the nmfre pipeline's model: section
# ---------------------------------------------------------------------------------------------


def _nmfre_model():
    from dnmf.config import get_pipeline

    return get_pipeline("nmfre").SECTIONS["model"]


def test_nmfre_signature_is_the_spec():
    assert _sig(dnmf.nmfre) == _sig(P.signature(P.NMFRE_PARAMS, first=("Y",)))
    # R's argument order up to client is positional; the rest keyword-only
    params = inspect.signature(dnmf.nmfre).parameters
    assert params["client"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["wild_seed"].kind is inspect.Parameter.KEYWORD_ONLY


def test_nmfre_engines_are_the_library_engines():
    from dnmf.mixed._core import ENGINES

    assert P.NMFRE_ENGINES == tuple(ENGINES)


def test_nmfre_yaml_model_section_is_the_spec():
    Model = _nmfre_model()
    got = {f.name: f.default for f in dataclasses.fields(Model)}
    expected = {p.name: (p.default if p.config_default is P._SAME else p.config_default)
                for p in P.NMFRE_PARAMS if p.config}
    assert got == expected
    # the pipeline's own defaults: the vignette's rank 1, the dfU scan's rate, the cap engine's maxit
    assert got == {"rank": 1, "df_rate": "scan", "prefix": "Basis", "epsilon": 1e-5, "maxit": 50000, "seed": 1,
                   "r_rng": False}
    lines = describe_section(Model, "model")
    for p in P.NMFRE_PARAMS:
        if p.config:
            assert any(line.startswith(f"model.{p.name}: ") and line.endswith(f" — {p.doc}") for line in lines)
    assert "model.df_rate: 'scan' or a float in (0.0, inf) (default 'scan') — " in lines[1]
    with pytest.raises(ConfigError, match=r"'model.rank' must be an int in \[1, inf\)"):
        build_section(Model, {"rank": 0}, "model")
    cfg = build_section(Model, {"rank": 1, "df_rate": 0.2, "prefix": "Trend"}, "model")
    kwargs = P.config_kwargs(P.NMFRE_PARAMS, cfg)
    assert kwargs == {"rank": 1, "df_rate": 0.2, "prefix": "Trend", "epsilon": 1e-5, "maxit": 50000, "seed": 1,
                      "r_rng": False}


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, r"^The 'rank' parameter of nmfre must be an int in \[1, inf\]\. Got 0 instead\.$"),
    ({"df_rate": 0.0}, r"^The 'df_rate' parameter of nmfre must be a float in \(0\.0, inf\)\. Got 0\.0 instead\.$"),
    ({"engine": "em"}, r"^The 'engine' parameter of nmfre must be"),
    ({"wild_level": 1.5}, r"^The 'wild_level' parameter of nmfre must be a float in \(0\.0, 1\.0\]"),
    ({"sigma2": 0.0}, r"^The 'sigma2' parameter of nmfre must be a float in \(0\.0, inf\)"),
    ({"dfu_control": "on"}, r"^The 'dfu_control' parameter of nmfre must be"),
])
def test_nmfre_checks_come_from_the_table(kwargs, message):
    from dnmf.datasets.orthodont import load_orthodont

    Y, A, _ = load_orthodont()
    with pytest.raises(InputError, match=message):
        dnmf.nmfre(Y, A, **{"rank": 1, "df_rate": 0.2, **kwargs})
    name = next(iter(kwargs))
    p = {q.name: q for q in P.NMFRE_PARAMS}[name]
    with pytest.raises(InputError, match=message):
        p.check(kwargs[name], "nmfre")
