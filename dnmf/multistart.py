"""Multi-start (RcppML §1.3): one fit per seed or initial matrix, the lowest final loss wins.

``nmf(A, k, seed=[1, 2, 3])`` or ``nmf(A, k, init=[W1, W2])`` runs each start as an
independent task — a whole fit on a worker when the matrix is held in memory and a Dask client
is in use (the matrix is sent once), otherwise one after another on the blocked engine — and
returns the best model with ``misc["all_inits"]``, a table of every start. A start's fit does not
depend on where it ran, so the choice is the same on any number of workers; ties go to the
first start.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

import numpy as np

__all__ = ["multi_start"]


def _start_task(start: dict, blocked, kwargs: Mapping, fit: Callable, client=False):
    return fit(blocked, **kwargs, **start, client=client)


def multi_start(blocked, fit: Callable, args: dict, *, func: str, r_rng_init: Callable, multi_seed: bool,
                multi_init: bool):
    """Fit every start and return the best model (see the module docstring).

    ``args`` are :func:`dnmf.nmf`'s arguments (without ``A``); ``fit`` is :func:`dnmf.nmf`
    (passed in: this module sits above ``dnmf.core``).
    """
    import pandas as pd

    from ._validation import param_error
    from .engine.executor import get_executor
    from .models import NMFModel

    if multi_seed and multi_init:
        raise param_error("init", func, "a single matrix or a name when seed is a list (one list of starts)",
                          "a list of matrices", described=True)
    if args.get("test_fraction"):
        raise param_error("seed", func, "a single seed with a test set (multi-start is not allowed with CV, "
                          "as in RcppML)", list(args["seed"]) if multi_seed else args["seed"])
    for bad in ("checkpoint", "on_iteration"):
        if args.get(bad) is not None:
            raise param_error(bad, func, "None in a multi-start (each start is its own fit)", args[bad])
    client = args.pop("client")
    kwargs = {key: v for key, v in args.items() if key not in ("seed", "init", "r_rng", "resume", "verbose")}
    m = blocked.shape[0]
    if multi_seed:
        seeds = list(args["seed"])
        if args["r_rng"]:
            starts = [dict(seed=s, init=r_rng_init(m, args["k"], s)) for s in seeds]
            labels = [f"R runif, seed {s}" for s in seeds]
        else:
            starts = [dict(seed=s, init=args["init"]) for s in seeds]
            labels = [f"seed {s}" for s in seeds]
    else:
        inits = list(args["init"])
        seed = args["seed"]
        starts = [dict(seed=seed, init=w) for w in inits]
        labels = [f"matrix {i + 1}" for i in range(len(inits))]
    executor = get_executor(client, func=func)
    try:
        if executor.distributed and blocked.in_memory:
            from .engine.kernel_cache import compile_for_workers, quiet_kwargs

            compile_for_workers(executor.client,  # the starts run whole on the workers: compile here first
                                lambda small: _start_task(starts[0], small, quiet_kwargs(kwargs), fit), blocked,
                                args["k"])
            models = executor.map(_start_task, starts, args=(blocked, kwargs, fit))
        else:
            models = [_start_task(s, blocked, kwargs, fit, client) for s in starts]
    finally:
        if not executor.distributed:
            executor.close()
    losses = np.array([float(mdl.misc["loss"]) for mdl in models])
    best = int(np.nanargmin(losses))
    table = pd.DataFrame({
        "init": labels,
        "seed": [s["seed"] for s in starts],
        "loss": losses,
        "iter": [int(mdl.misc["iter"]) for mdl in models],
        "selected": np.arange(len(models)) == best,
    })
    chosen = models[best]
    record = replace(chosen.misc.record, all_inits=table)
    return NMFModel(w=chosen.w, d=chosen.d, h=chosen.h, misc=type(chosen.misc)(record))
