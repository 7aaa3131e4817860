"""CI only: compile the kernels the test suite uses most into numba's on-disk cache.

``.ci/run`` runs this in the background from the base install, beside the quickstart, the test
extras' install and the first tests. numba keeps the compiled kernels beside the checkout's
source files (``dnmf/**/__pycache__``), and the test processes load them instead of compiling
them again (docs/architecture.md, "Kernel compilation"). Nothing is checked here: a kernel this did not
compile is compiled by the test that needs it, as on any fresh machine.
"""

import time
import warnings

import scipy.sparse as sp

import dnmf

warnings.simplefilter("ignore")
A = sp.random(200, 300, density=0.1, format="csc", random_state=0)
for kw in (dict(solver="cd"), dict(solver="exact"), dict(dtype="float32"), dict(test_fraction=0.1),
           dict(mask="zeros"), dict(loss="kl"), dict(loss="nb"), dict(loss="gp")):
    t = time.perf_counter()
    dnmf.nmf(A, 3, seed=1, maxit=2, client=False, **kw)
    print(f"warm: {kw} {time.perf_counter() - t:.1f} s", flush=True)
