"""NMF with random effects (NMF-RE): dfU scan, fit and wild-bootstrap inference.

The nmfkc vignette's workflow as one job: ``dnmf.nmfre_dfu_scan`` over the df rates (one
parallel task per rate, each checkpointed as it finishes), ``dnmf.nmfre`` at the chosen rate,
then ``dnmf.nmfre_inference`` (bootstrap chunks as parallel tasks).

Config sections::

    input:  {dataset: orthodont}          # or {Y: y.csv, A: a.csv}: CSV with row names
    model:  {rank: 1, df_rate: 0.2, prefix: Trend, epsilon: 1e-5, maxit: 50000, seed: 1, r_rng: false}
    scan:   {enabled: true, rates: [0.1, 0.2, ..., 1.0]}
    inference: {enabled: true, wild_B: 500, level: 0.95, seed: 123, side: auto}

``model.df_rate: scan`` takes the scan's automatic choice (spec/nmfre.md §4.1).

Outputs: ``nmfre/`` (X, C, U, B, XB, XB_blup, objective trace, variances, R², ICC, dfU, ...),
``tables/scan`` and ``tables/coefficients``; ``<run>-summary.txt`` (R's ``summary()``),
``<run>-convergence.png``, ``<run>-growth_curves.png`` and ``<run>-random_effects.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

import dnmf
import dnmf.datasets
import dnmf.params
from dnmf.mixed.nmfre import DEFAULT_RATES as _LIBRARY_RATES
from dnmf.mixed.scan import choose_rate

#: The df rates the library scans by default (0.1, ..., 1.0), as plain floats for the config.
DEFAULT_RATES = tuple(float(r) for r in _LIBRARY_RATES)
DATASETS = ("orthodont",)


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


@dataclass(frozen=True)
class NMFREInput:
    """``input:``: a bundled data set, or Y (and optionally A) as CSV files with row names."""

    dataset: str | None = field(default=None, metadata=_meta("bundled data set", choices=DATASETS))
    Y: str | None = field(default=None, metadata=_meta("CSV of Y (P × N): a header of unit names, "
                                                        "the first column row names", exists=True))
    A: str | None = field(default=None, metadata=_meta("CSV of the covariates A (K × N), same layout "
                                                        "(default: an intercept row)", exists=True))

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        given = {k: getattr(self, k) for k in ("dataset", "Y", "A") if getattr(self, k) is not None}
        if self.dataset is None and self.Y is None or self.dataset is not None and len(given) > 1:
            yield ("", "a mapping with either 'dataset' or a CSV file 'Y' (and optionally 'A')", given)


#: ``model:``: the YAML parameters of :data:`dnmf.params.NMFRE_PARAMS` (declared once, with
#: :func:`dnmf.nmfre`'s signature and checks), run with the df-cap engine.
NMFREModel = dnmf.params.config_section(
    dnmf.params.NMFRE_PARAMS, "NMFREModel", module=__name__,
    doc="``model:``: the arguments of :func:`dnmf.nmfre` (df-cap engine).")


@dataclass(frozen=True)
class NMFREScan:
    """``scan:``: the dfU scan (one task per rate)."""

    enabled: bool = field(default=True, metadata=_meta("run the scan"))
    rates: tuple[float, ...] = field(default=DEFAULT_RATES, metadata=_meta(
        "df rates to scan", min=0.0, min_open=True, nonempty=True))


@dataclass(frozen=True)
class NMFREInference:
    """``inference:``: sandwich standard errors and the wild bootstrap for Θ."""

    enabled: bool = field(default=True, metadata=_meta("run the inference"))
    wild_B: int = field(default=500, metadata=_meta("bootstrap replicates", min=2))
    level: float = field(default=0.95, metadata=_meta("percentile interval level", min=0.0, min_open=True, max=1.0))
    seed: int = field(default=123, metadata=_meta("bootstrap seed (R's wild.seed)", min=0))
    side: Literal["auto", "one.sided", "two.sided"] = field(default="auto", metadata=_meta(
        "p-value side (auto: one-sided for the non-negative Θ of the df-cap engine)"))


SECTIONS = {"input": NMFREInput, "model": NMFREModel, "scan": NMFREScan, "inference": NMFREInference}


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections."""
    if config.model.df_rate == "scan" and not config.scan.enabled:
        yield ("model.df_rate", "a float in (0.0, inf) when scan.enabled is false", "scan")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def load_input(inp: NMFREInput):
    """``(Y, A)`` as pandas DataFrames (A None for the intercept-only model)."""
    import pandas as pd

    if inp.dataset == "orthodont":
        from dnmf.datasets.orthodont import load_orthodont

        data = load_orthodont()
        Y, A = data.Y_frame(), data.A_frame()
    else:
        Y = pd.read_csv(os.path.expanduser(inp.Y), index_col=0)
        A = pd.read_csv(os.path.expanduser(inp.A), index_col=0) if inp.A is not None else None
    Y = Y if isinstance(Y, pd.DataFrame) else pd.DataFrame(np.asarray(Y, dtype=float))
    if A is not None and not isinstance(A, pd.DataFrame):
        A = pd.DataFrame(np.asarray(A, dtype=float))
    return Y, A


# ---------------------------------------------------------------------------------------------
# Tasks and their checkpoints
# ---------------------------------------------------------------------------------------------


def scan_rate(rate: float, *, Y, A, rank: int, epsilon: float, maxit: int, seed: int, prefix: str,
              r_rng: bool = False) -> dict:
    """One row of the dfU scan table (a sweep task; runs on a worker)."""
    scan = dnmf.nmfre_dfu_scan([rate], Y, A, rank=rank, epsilon=epsilon, maxit=maxit, seed=seed, prefix=prefix,
                               r_rng=r_rng, client=False)
    row = scan.table.iloc[0].to_dict()
    return {k: (None if v is None else v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def result_payload(res) -> dict:
    """An NMFREResult as store payload (arrays, tables and plain values)."""
    out = {}
    for f in dataclasses.fields(res):
        value = getattr(res, f.name)
        if f.name == "dfU_cap_scan":
            value = None  # the scan is stored on its own (tables/scan)
        out[f.name] = value
    return out


def result_from_payload(payload) -> Any:
    """The NMFREResult saved by :func:`result_payload`."""
    kwargs = {}
    for f in dataclasses.fields(dnmf.NMFREResult):
        kwargs[f.name] = payload.get(f.name)
    return dnmf.NMFREResult(**kwargs)


def _cached(job, key: str, compute):
    """Run ``compute()`` once per run: a resumed run loads the saved result instead."""
    if job.resume and job.store.task_done(key):
        job.echo(f"{key}: finished before the interruption; loaded from the checkpoint")
    else:
        job.store.save_task(key, result_payload(compute()))
    return result_from_payload(job.store.load_task(key))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _scan(config, job, Y, A):
    import pandas as pd

    m = config.model
    rates = list(config.scan.rates)
    fn = functools.partial(scan_rate, Y=Y, A=A, rank=m.rank, epsilon=m.epsilon, maxit=m.maxit, seed=m.seed,
                           prefix=m.prefix, r_rng=m.r_rng)
    rows = job.run_tasks(fn, rates, [f"scan-rate-{r:g}" for r in rates], desc="dfU scan",
                         to_payload=lambda row: {"row": row}, from_payload=lambda p: p["row"])
    table = pd.DataFrame(rows, columns=list(rows[0]))
    table["safeguard"] = table["safeguard"].astype(object)
    return table, choose_rate(table)


def _plots(config, job, fit, Y, A):
    job.save_figure(fit.plot_convergence(), "convergence")
    group, labels = None, ("group 1", "group 0")
    if A is not None and A.shape[0] >= 2:
        row = np.asarray(A.iloc[1], dtype=float)
        if set(np.unique(row)) <= {0.0, 1.0}:
            group, name = row, str(A.index[1])
            labels = (name, f"not {name}")
    names = fit.feature_names
    job.save_figure(job.plots.growth_curves(np.asarray(Y, dtype=float), fit.XB, fit.XB_blup, feature_names=names,
                                            group=group, group_labels=labels,
                                            title=f"{config.name}: NMF-RE growth curves"), "growth_curves")
    job.save_figure(job.plots.random_effects(fit.U, sample_names=fit.sample_names, basis_names=fit.basis_names,
                                             group=group, group_labels=labels,
                                             title=f"{config.name}: random effects U"), "random_effects")


def run(config, job) -> None:
    """dfU scan → NMF-RE fit → inference; writes tables, arrays, the summary and plots."""
    m, inf = config.model, config.inference
    Y, A = load_input(config.input)
    table = None
    if config.scan.enabled:
        table, auto_rate = _scan(config, job, Y, A)
        job.write_table("scan", table)
        job.echo("dfU scan:\n" + table.to_string(index=False) + f"\nautomatic df rate: {auto_rate:g}")
    rate = auto_rate if m.df_rate == "scan" else float(m.df_rate)
    if not np.isfinite(rate):
        raise dnmf.InputError("No df rate of the dfU scan qualifies (safeguard, hit and converged); "
                              "set model.df_rate explicitly.")
    job.add_seeds(nmfkc_init=m.seed, wild_bootstrap=inf.seed if inf.enabled else None)

    def fit_once():
        kwargs = {**dnmf.params.config_kwargs(dnmf.params.NMFRE_PARAMS, m), "df_rate": rate}
        return dnmf.nmfre(Y, A, **kwargs, wild_bootstrap=False, client=False)

    bar = job.progress("fit", 1, unit="task")
    fit = _cached(job, "fit", fit_once)
    bar.update(1, f"{fit.n_iter} iterations, {fit.stop_reason}")
    bar.close()
    if inf.enabled:
        bar = job.progress("inference", 1, unit="task")
        fit = _cached(job, "inference", lambda: dnmf.nmfre_inference(
            fit, Y, A, wild_B=inf.wild_B, wild_level=inf.level, side=None if inf.side == "auto" else inf.side,
            seed=inf.seed, r_rng=m.r_rng, client=job.client))
        bar.update(1, f"wild_B={inf.wild_B}")
        bar.close()
        job.write_table("coefficients", fit.coefficients)
    payload = result_payload(fit)
    payload.pop("coefficients")
    payload["df_rate_used"] = rate
    payload["df_rate_source"] = "scan" if m.df_rate == "scan" else "config"
    job.write("nmfre", {k: v for k, v in payload.items() if v is not None})
    summary = fit.summary()
    job.add_text("summary", summary)
    job.echo(summary)
    _plots(config, job, fit, Y, A)
