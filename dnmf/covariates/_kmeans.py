"""R's ``stats::kmeans`` (Hartigan–Wong, AS 136) driven by the emulated R random stream.

Used by :func:`dnmf.nmfkc` with ``r_rng=True`` so that k-means starts at rank Q ≥ 2 match
R's ``set.seed(seed); kmeans(t(Y), centers=Q, iter.max=maxit, nstart=nstart)``.

The algorithm is Hartigan & Wong (1979), Applied Statistics algorithm AS 136: an
optimal-transfer stage (each point may move to the cluster that most decreases the
within-cluster sum of squares) alternated with a quick-transfer stage (moves between each
point's two closest clusters), with the "live set" bookkeeping of the paper. It is written
here from the published algorithm description; the kernel is a module-level numba function.
"""

from __future__ import annotations

import numba
import numpy as np

from ..exceptions import DnmfError

__all__ = ["kmeans_hw", "r_kmeans"]

_BIG = 1.0e30


@numba.njit(cache=True, nogil=True)
def _optra(a, c, ic1, ic2, nc, an1, an2, ncp, d, itran, live, indx):
    m, n = a.shape
    k = c.shape[0]
    for l in range(k):
        if itran[l] == 1:
            live[l] = m + 1
    for i in range(m):
        i1 = i + 1  # 1-based step number, as in the paper's bookkeeping
        indx += 1
        l1 = ic1[i]
        if nc[l1] != 1:
            if ncp[l1] != 0:
                de = 0.0
                for j in range(n):
                    df = a[i, j] - c[l1, j]
                    de += df * df
                d[i] = de * an1[l1]
            da = 0.0
            ll = ic2[i]
            for j in range(n):
                db = a[i, j] - c[ll, j]
                da += db * db
            r2 = da * an2[ll]
            l2 = ll
            for l in range(k):
                if (i1 >= live[l1] and i1 >= live[l]) or l == l1 or l == ll:
                    continue
                rr = r2 / an2[l]
                dc = 0.0
                skip = False
                for j in range(n):
                    dd = a[i, j] - c[l, j]
                    dc += dd * dd
                    if dc >= rr:
                        skip = True
                        break
                if skip:
                    continue
                r2 = dc * an2[l]
                l2 = l
            if r2 >= d[i]:
                ic2[i] = l2
            else:
                indx = 0
                live[l1] = m + i1
                live[l2] = m + i1
                ncp[l1] = i1
                ncp[l2] = i1
                al1 = float(nc[l1])
                alw = al1 - 1.0
                al2 = float(nc[l2])
                alt = al2 + 1.0
                for j in range(n):
                    c[l1, j] = (c[l1, j] * al1 - a[i, j]) / alw
                    c[l2, j] = (c[l2, j] * al2 + a[i, j]) / alt
                nc[l1] -= 1
                nc[l2] += 1
                an2[l1] = alw / al1
                an1[l1] = _BIG
                if alw > 1.0:
                    an1[l1] = alw / (alw - 1.0)
                an1[l2] = alt / al2
                an2[l2] = alt / (alt + 1.0)
                ic1[i] = l2
                ic2[i] = l1
        if indx == m:
            return indx
    for l in range(k):
        itran[l] = 0
        live[l] -= m
    return indx


@numba.njit(cache=True, nogil=True)
def _qtran(a, c, ic1, ic2, nc, an1, an2, ncp, d, itran, indx, imaxqtr):
    """Quick-transfer stage; returns (indx, exceeded)."""
    m, n = a.shape
    icoun = 0
    istep = 0
    while True:
        for i in range(m):
            icoun += 1
            istep += 1
            if istep >= imaxqtr:
                return indx, True
            l1 = ic1[i]
            l2 = ic2[i]
            if nc[l1] != 1:
                if istep <= ncp[l1]:
                    da = 0.0
                    for j in range(n):
                        db = a[i, j] - c[l1, j]
                        da += db * db
                    d[i] = da * an1[l1]
                if not (istep >= ncp[l1] and istep >= ncp[l2]):
                    r2 = d[i] / an2[l2]
                    dd = 0.0
                    move = True
                    for j in range(n):
                        de = a[i, j] - c[l2, j]
                        dd += de * de
                        if dd >= r2:
                            move = False
                            break
                    if move:
                        icoun = 0
                        indx = 0
                        itran[l1] = 1
                        itran[l2] = 1
                        ncp[l1] = istep + m
                        ncp[l2] = istep + m
                        al1 = float(nc[l1])
                        alw = al1 - 1.0
                        al2 = float(nc[l2])
                        alt = al2 + 1.0
                        for j in range(n):
                            c[l1, j] = (c[l1, j] * al1 - a[i, j]) / alw
                            c[l2, j] = (c[l2, j] * al2 + a[i, j]) / alt
                        nc[l1] -= 1
                        nc[l2] += 1
                        an2[l1] = alw / al1
                        an1[l1] = _BIG
                        if alw > 1.0:
                            an1[l1] = alw / (alw - 1.0)
                        an1[l2] = alt / al2
                        an2[l2] = alt / (alt + 1.0)
                        ic1[i] = l2
                        ic2[i] = l1
            if icoun == m:
                return indx, False


@numba.njit(cache=True, nogil=True)
def _kmns(a, c, iter_max, imaxqtr):
    """AS 136 on data ``a`` (m × n) from centres ``c`` (k × n, updated in place).

    Returns (ic1, nc, wss, ifault): 0 ok, 1 empty cluster, 2 iterations exceeded,
    3 bad k, 4 quick-transfer steps exceeded.
    """
    m, n = a.shape
    k = c.shape[0]
    ic1 = np.zeros(m, dtype=np.int64)
    ic2 = np.zeros(m, dtype=np.int64)
    nc = np.zeros(k, dtype=np.int64)
    an1 = np.zeros(k)
    an2 = np.zeros(k)
    ncp = np.zeros(k, dtype=np.int64)
    d = np.zeros(m)
    itran = np.zeros(k, dtype=np.int64)
    live = np.zeros(k, dtype=np.int64)
    wss = np.zeros(k)
    if k <= 1 or k >= m:
        return ic1, nc, wss, 3
    dt = np.zeros(2)
    for i in range(m):
        ic1[i] = 0
        ic2[i] = 1
        for il in range(2):
            s = 0.0
            for j in range(n):
                da = a[i, j] - c[il, j]
                s += da * da
            dt[il] = s
        if dt[0] > dt[1]:
            ic1[i] = 1
            ic2[i] = 0
            tmp = dt[0]
            dt[0] = dt[1]
            dt[1] = tmp
        for l in range(2, k):
            db = 0.0
            far = False
            for j in range(n):
                dc = a[i, j] - c[l, j]
                db += dc * dc
                if db >= dt[1]:
                    far = True
                    break
            if far:
                continue
            if db < dt[0]:
                dt[1] = dt[0]
                ic2[i] = ic1[i]
                dt[0] = db
                ic1[i] = l
            else:
                dt[1] = db
                ic2[i] = l
    for l in range(k):
        nc[l] = 0
        for j in range(n):
            c[l, j] = 0.0
    for i in range(m):
        l = ic1[i]
        nc[l] += 1
        for j in range(n):
            c[l, j] += a[i, j]
    for l in range(k):
        if nc[l] == 0:
            return ic1, nc, wss, 1
        aa = float(nc[l])
        for j in range(n):
            c[l, j] /= aa
        an2[l] = aa / (aa + 1.0)
        an1[l] = _BIG
        if aa > 1.0:
            an1[l] = aa / (aa - 1.0)
        itran[l] = 1
        ncp[l] = -1
    indx = np.int64(0)  # not the literal 0: numba would compile _optra once more for Literal[int](0)
    ifault = 2
    for _ij in range(iter_max):
        indx = _optra(a, c, ic1, ic2, nc, an1, an2, ncp, d, itran, live, indx)
        if indx == m:
            ifault = 0
            break
        indx, exceeded = _qtran(a, c, ic1, ic2, nc, an1, an2, ncp, d, itran, indx, imaxqtr)
        if exceeded:
            ifault = 4
            break
        if k == 2:
            ifault = 0
            break
        for l in range(k):
            ncp[l] = 0
    for l in range(k):
        wss[l] = 0.0
        for j in range(n):
            c[l, j] = 0.0
    for i in range(m):
        ii = ic1[i]
        for j in range(n):
            c[ii, j] += a[i, j]
    for j in range(n):
        for l in range(k):
            c[l, j] /= float(nc[l])
        for i in range(m):
            ii = ic1[i]
            da = a[i, j] - c[ii, j]
            wss[ii] += da * da
    return ic1, nc, wss, ifault


def kmeans_hw(x: np.ndarray, centers: np.ndarray, iter_max: int = 10):
    """Hartigan–Wong k-means of the rows of ``x`` (m × n) from ``centers`` (k × n).

    Returns
    -------
    centers : ndarray of shape (k, n)
    cluster : ndarray of int of shape (m,)
        0-based cluster of each row.
    wss : ndarray of shape (k,)
        Within-cluster sums of squares.
    ifault : int
        0 ok, 1 empty cluster, 2 ``iter_max`` reached, 3 k not in [2, m), 4 quick-transfer
        steps exceeded (as R's ``kmns``).
    """
    a = np.ascontiguousarray(x, dtype=np.float64)
    c = np.array(centers, dtype=np.float64, order="C")
    m = a.shape[0]
    imaxqtr = int(min(2**31 - 1, 50 * m))
    ic1, _nc, wss, ifault = _kmns(a, c, int(iter_max), imaxqtr)
    return c, ic1, wss, int(ifault)


def _unique_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` without duplicates, first occurrences in order (R ``unique``)."""
    seen = set()
    keep = []
    for i, row in enumerate(x):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return x[keep]


def r_kmeans(x: np.ndarray, k: int, rr, iter_max: int = 10, nstart: int = 1) -> np.ndarray:
    """Centres (k × n) of R's ``kmeans(x, centers=k, iter.max, nstart)`` on the stream ``rr``.

    ``rr`` is a :class:`dnmf.rrng.RRandom` positioned as R's stream at the call. Raises
    :class:`~dnmf.exceptions.DnmfError` where R's ``kmeans`` stops (too few distinct points,
    empty cluster, k not below the number of points); k = 1 returns the mean like R.
    """
    x = np.asarray(x, dtype=float)
    m = x.shape[0]
    if m < k:
        raise DnmfError("more cluster centers than data points")
    cn = None
    centers = None
    if nstart == 1:
        centers = x[rr.sample_int(m, k)]
    if nstart >= 2 or len(_unique_rows(centers)) < k:
        cn = _unique_rows(x)
        if cn.shape[0] < k:
            raise DnmfError("more cluster centers than distinct data points.")
        centers = cn[rr.sample_int(cn.shape[0], k)]
    if k == 1:
        return x.mean(axis=0, keepdims=True)

    def do_one(c0):
        c, _cl, wss, ifault = kmeans_hw(x, c0, iter_max)
        if ifault == 1:
            raise DnmfError("empty cluster: try a better set of initial centers")
        if ifault == 3:
            raise DnmfError("number of cluster centres must lie between 1 and nrow(x)")
        return c, float(wss.sum())

    best_c, best = do_one(centers)
    if nstart >= 2 and cn is not None:
        for _ in range(1, nstart):
            c, z = do_one(cn[rr.sample_int(cn.shape[0], k)])
            if z < best:
                best_c, best = c, z
    return best_c
