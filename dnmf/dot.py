"""Graphviz DOT diagrams of NMF-with-covariates fits (R ``nmfkc.DOT``, spec §8).

:func:`nmfkc_dot` draws Y ≈ X Θ A as a path diagram: covariates A → basis X (edge labels Θ,
with significance stars when the result carries an inference table) and X → observations Y
(edge labels X). The text matches R's output character for character.

It reads only these attributes of ``result`` (duck typing, so both
:class:`dnmf.covariates.NMFKCResult` / :class:`dnmf.covariates.NMFKCInference` and
:class:`dnmf.mixed.NMFREResult` work):

* ``X`` (P × Q) and ``C`` (Q × K): required;
* ``B`` (Q × N): optional; with it, a C with as many columns as B (a fit without A) has no
  A block, as in R;
* ``coefficients``: optional pandas DataFrame with columns ``Basis``, ``Covariate``,
  ``p_value`` (the inference table), matched to ``basis_names`` × ``covariate_names``;
* ``C_signed``: optional bool (signed Θ: |Θ| thresholds, dashed negative edges);
* ``basis_names``, ``covariate_names``, ``feature_names``: optional labels (R's
  ``colnames(X)``, ``colnames(C)``, ``rownames(X)``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ._validation import check_option, param_error
from .covariates._common import dot_id
from .exceptions import DnmfError

__all__ = ["DotGraph", "nmfkc_dot", "PRINT_HINT"]

#: Printed after the DOT text (upstream: "# Use plot() to render (requires DiagrammeR), or write
#: this text to a .dot file."; here the Python ways to render or save it).
PRINT_HINT = "# Use .render(path) to render (requires Graphviz), or .save(path) to write this text to a .dot file."

_FUNC = "nmfkc_dot"
_FORMATS = ("svg", "png", "pdf")


@dataclass(frozen=True)
class DotGraph:
    """A DOT script.

    Attributes
    ----------
    source : str
        The Graphviz DOT text (ends with ``"}\\n"``).
    """

    source: str

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        """The DOT text followed by the hint line (R's ``print.nmfkc.DOT``, spec §7.3)."""
        return self.source + PRINT_HINT + "\n"

    def save(self, path) -> Path:
        """Write the DOT text to ``path`` (e.g. ``model.dot``)."""
        p = Path(path)
        p.write_text(self.source)
        return p

    def render(self, path, format: str = "svg") -> Path:  # noqa: A002
        """Render with the Graphviz ``dot`` program to ``path`` (svg, png or pdf).

        Raises
        ------
        DnmfError
            When ``dot`` is not on PATH (install Graphviz: ``apt install graphviz``,
            ``conda install -c conda-forge graphviz`` or ``brew install graphviz``), or
            when it fails on the script.
        """
        format = check_option(format, "format", "DotGraph.render", _FORMATS)
        exe = shutil.which("dot")
        if exe is None:
            raise DnmfError(
                "Rendering needs the Graphviz 'dot' program, which is not on PATH. Install Graphviz "
                "(apt install graphviz / conda install -c conda-forge graphviz / brew install graphviz) "
                "or write the text with DotGraph.save(path) and render it elsewhere."
            )
        p = Path(path)
        proc = subprocess.run([exe, f"-T{format}", "-o", str(p)], input=self.source.encode(),
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise DnmfError(f"Graphviz 'dot' failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
        return p


# ------------------------------------------------------------------ R helper ports -----


def _digits_from_threshold(threshold: float) -> int:
    """Decimal places of ``format(threshold, scientific=FALSE)`` (2 if ≤ 0, 0 if ≥ 1)."""
    if not np.isfinite(threshold) or threshold <= 0:
        return 2
    if threshold >= 1:
        return 0
    # R's format(): 7 significant digits, positional
    s = np.format_float_positional(float(threshold), precision=7, unique=True, fractional=False, trim="-")
    return len(s.removeprefix("0."))


def _fmt(x: float, digits: int) -> str:
    if not np.isfinite(x):
        return ""
    return f"{x:.{max(digits, 0)}f}"


def _penwidth(value: float, max_value: float, scale: float, min_pw: float = 0.5) -> float:
    if not np.isfinite(max_value) or max_value <= 0:
        return min_pw
    if not np.isfinite(value) or value <= 0:
        return min_pw
    return max(min_pw, value * scale / max_value)


def _header(name: str, rankdir: str) -> str:
    return (
        f"digraph {name} {{\n"
        f"  graph [rankdir={rankdir} compound=true];\n"
        '  splines=true; nodesep=0.4; ranksep=0.7; fontname="Arial";\n'
    )


def _cluster(cid, title, ids, labels, shape, fill, fillcolor, line_width, indent="  ") -> str:
    if not ids:
        return ""
    if fill:
        style = f'{indent}node [shape={shape}, style="filled,rounded", fillcolor="{fillcolor}", color=black, penwidth={line_width:.1f}];\n'
    else:
        style = f'{indent}node [shape={shape}, style="rounded", color=black, penwidth={line_width:.1f}];\n'
    s = f'{indent}subgraph cluster_{cid}{{label="{title}" style="rounded" color="black" penwidth={1.0:.1f};\n' + style
    for i, lab in zip(ids, labels):
        s += f'{indent}  {i} [label="{lab}"];\n'
    return s + f"{indent}}}\n"


def _labels(given, default, prefix, n, what):
    if given is not None:
        given = [str(v) for v in given]
        if len(given) != n:
            raise param_error(what, _FUNC, f"{n} labels", f"{len(given)} labels")
        return given
    if default is not None and len(default) == n:
        return [str(v) for v in default]
    return [f"{prefix}{i + 1}" for i in range(n)]


def nmfkc_dot(
    result: Any,
    type: str = "YXA",  # noqa: A002
    threshold: float = 0.01,
    *,
    C_signed: Optional[bool] = None,
    sig_level: Optional[float] = 0.1,
    rankdir: str = "LR",
    fill: bool = True,
    weight_scale: float = 5.0,
    weight_scale_ax: Optional[float] = None,
    weight_scale_xy: Optional[float] = None,
    weight_scale_ay: Optional[float] = None,
    Y_label: Optional[Sequence[str]] = None,
    X_label: Optional[Sequence[str]] = None,
    A_label: Optional[Sequence[str]] = None,
    Y_title: str = "Observation (Y)",
    X_title: str = "Basis (X)",
    A_title: str = "Covariates (A)",
    hide_isolated: bool = True,
    edge_style: bool = True,
) -> DotGraph:
    """Graphviz DOT script of an NMF / NMF-with-covariates fit (R ``nmfkc.DOT``).

    Parameters
    ----------
    result : NMFKCResult, NMFKCInference, NMFREResult or any object with ``X`` and ``C``
        See the module docstring for the attributes read.
    type : {"YXA", "YX", "YA"}, default "YXA"
        ``"YXA"``: A → X (Θ) and X → Y (X); ``"YX"``: X → Y only; ``"YA"``: A → Y with XΘ.
    threshold : float, default 0.01
        Edges (and, with ``hide_isolated``, nodes) below this value are not drawn
        (|value| for signed Θ). It also sets the label decimals (0.01 → 2).
    C_signed : bool or None
        Signed Θ mode; None auto-detects from ``result.C_signed`` or negative entries.
    sig_level : float or None, default 0.1
        With an inference table, an A → X edge is drawn iff its p-value < ``sig_level``;
        None falls back to the threshold. Stars: *** p<0.001, ** p<0.01, * p<0.05.
    rankdir : str, default "LR"
    fill : bool, default True
        Filled node shapes.
    weight_scale : float, default 5
        Maximum edge width; ``weight_scale_ax``/``_xy``/``_ay`` override it per edge group.
    Y_label, X_label, A_label : sequence of str, optional
        Node labels (defaults: ``feature_names``/``Y1..``, ``basis_names``/``Factor1..``,
        ``covariate_names``/``A1..``).
    Y_title, X_title, A_title : str
        Cluster titles.
    hide_isolated : bool, default True
        Drop Y and A nodes with no value ≥ threshold.
    edge_style : bool, default True
        Append ``style=solid|dashed`` to Θ edges (R at HEAD); False gives the 2026-03
        (56d65eb) text without it.

    Returns
    -------
    DotGraph
        ``.source`` holds the text; ``.render(path, format)`` draws it with Graphviz.

    Notes
    -----
    penwidth = max(0.5, value·weight_scale / max value of the edge group).

    Examples
    --------
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> from dnmf import nmfkc, nmfkc_dot
    >>> Y, A, _ = load_orthodont()
    >>> g = nmfkc_dot(nmfkc(Y, A, rank=1))
    >>> g.source.splitlines()[0]
    'digraph NMF {'
    """
    type = check_option(type, "type", _FUNC, ("YX", "YA", "YXA"))
    try:
        X = np.asarray(result.X, dtype=float)
        C_raw = getattr(result, "C", None)
    except AttributeError as e:
        raise param_error("result", _FUNC, "a fit with attributes X and C", type(result).__name__) from e
    if X.ndim != 2:
        raise param_error("result", _FUNC, "a fit whose X is a 2-D (P, Q) array", f"shape {X.shape}")
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)):
        raise param_error("threshold", _FUNC, "a real number", threshold)
    if sig_level is not None and not (isinstance(sig_level, (int, float)) and 0 < sig_level <= 1):
        raise param_error("sig_level", _FUNC, "a float in (0, 1] or None", sig_level)
    ws_ax = weight_scale if weight_scale_ax is None else weight_scale_ax
    ws_xy = weight_scale if weight_scale_xy is None else weight_scale_xy
    ws_ay = weight_scale if weight_scale_ay is None else weight_scale_ay

    P, Q = X.shape
    B = getattr(result, "B", None)
    C = None if C_raw is None else np.asarray(C_raw, dtype=float)
    hasA = C is not None and (B is None or C.shape[1] != np.asarray(B).shape[1])

    Y_labels = _labels(Y_label, getattr(result, "feature_names", None), "Y", P, "Y_label")
    X_labels = _labels(X_label, getattr(result, "basis_names", None), "Factor", Q, "X_label")
    Y_ids = [dot_id(f"Y_{i + 1}") for i in range(P)]
    X_ids = [dot_id(f"X_{j + 1}") for j in range(Q)]

    XC = None
    if hasA:
        Kc = C.shape[1]
        A_labels = _labels(A_label, getattr(result, "covariate_names", None), "A", Kc, "A_label")
        A_ids = [dot_id(f"A_{k + 1}") for k in range(Kc)]
        XC = X @ C
    elif type == "YX":
        Kc, A_labels, A_ids, C = 0, [], [], None
    else:
        raise param_error("type", _FUNC, "'YX' for a fit without covariates (C has no A block)", type)

    if C_signed is None:
        C_signed = bool(getattr(result, "C_signed", False)) or (C is not None and bool((C < 0).any())) or (
            XC is not None and bool((XC < 0).any())
        )
    C_signed = bool(C_signed)

    def mag(v):
        return np.abs(v) if C_signed else v

    def estyle(v):
        return "dashed" if C_signed and np.isfinite(v) and v < 0 else "solid"

    idx_Y = list(range(P))
    idx_A = list(range(Kc))
    if hide_isolated:
        if type in ("YX", "YXA"):
            idx_Y = [i for i in range(P) if np.any(X[i] >= threshold)]
        elif XC is not None:
            idx_Y = [i for i in range(P) if np.any(mag(XC[i]) >= threshold)]
        if hasA and type == "YXA":
            idx_A = [k for k in range(Kc) if np.any(mag(C[:, k]) >= threshold)]
        elif hasA and type == "YA":
            idx_A = [k for k in range(Kc) if np.any(mag(XC[:, k]) >= threshold)]

    scr = _header("NMF", rankdir)
    scr += "\n  // Output variables (Y)\n" + _cluster(
        "Y", Y_title, [Y_ids[i] for i in idx_Y], [Y_labels[i] for i in idx_Y], "box", fill, "lightblue", 1.5
    )
    if type != "YA":
        scr += "\n  // Latent factors (X)\n" + _cluster("X", X_title, X_ids, X_labels, "ellipse", fill, "wheat", 1.0)
    if type != "YX" and hasA:
        scr += "\n  // Covariates (A)\n" + _cluster(
            "A", A_title, [A_ids[k] for k in idx_A], [A_labels[k] for k in idx_A], "box", fill, "lightcoral", 1.5
        )

    # significance stars from an inference table
    C_stars = C_show = None
    cf = getattr(result, "coefficients", None)
    if cf is not None and hasA:
        C_stars = np.full((Q, Kc), "", dtype=object)
        C_pval = np.full((Q, Kc), np.nan)
        bnames = list(getattr(result, "basis_names", None) or [])
        cnames = list(getattr(result, "covariate_names", None) or [])
        for b, c, p in zip(cf["Basis"], cf["Covariate"], cf["p_value"]):
            if b in bnames and c in cnames and p is not None and not (isinstance(p, float) and np.isnan(p)):
                q, r = bnames.index(b), cnames.index(c)
                p = float(p)
                C_pval[q, r] = p
                C_stars[q, r] = "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""
        if sig_level is not None:
            C_show = ~np.isnan(C_pval) & (np.nan_to_num(C_pval, nan=np.inf) < sig_level)

    scr += '\n  edge [fontname="Arial", fontsize=8, arrowhead=open];\n'
    digits = _digits_from_threshold(float(threshold))

    def c_edge(src, dst, val, pen, lab):
        tail = f", style={estyle(val)}" if edge_style else ""
        return f'  {src} -> {dst} [label="{lab}", penwidth={pen:.2f}{tail}];\n'

    def x_to_y_edges():
        s = '\n  // X -> Y edges (X)\n  edge [color="gray0", fontcolor="gray0", style=solid];\n'
        max_X = float(np.nanmax(X)) if X.size else np.nan
        if np.isfinite(max_X) and max_X > 0:
            for i in idx_Y:
                for j in range(Q):
                    v = X[i, j]
                    if np.isfinite(v) and v >= threshold:
                        s += f'  {X_ids[j]} -> {Y_ids[i]} [label="{_fmt(v, digits)}", penwidth={_penwidth(v, max_X, ws_xy):.2f}];\n'
        return s

    if type == "YXA":
        scr += "\n  // A -> X edges (C)\n  edge [color=black, fontcolor=black, style=solid];\n"
        max_C = float(np.nanmax(mag(C))) if C.size else np.nan
        if np.isfinite(max_C) and max_C > 0:
            for q in range(Q):
                for k in idx_A:
                    v = C[q, k]
                    show = bool(C_show[q, k]) if C_show is not None else (np.isfinite(v) and mag(v) >= threshold)
                    if show:
                        lab = _fmt(v, digits) + (C_stars[q, k] if C_stars is not None else "")
                        scr += c_edge(A_ids[k], X_ids[q], v, _penwidth(mag(v), max_C, ws_ax), lab)
        scr += x_to_y_edges()
    elif type == "YA":
        scr += "\n  // A -> Y edges (X %*% C)\n  edge [color=black, fontcolor=black, style=solid];\n"
        max_XC = float(np.nanmax(mag(XC))) if XC.size else np.nan
        if np.isfinite(max_XC) and max_XC > 0:
            for i in idx_Y:
                for k in idx_A:
                    v = XC[i, k]
                    if np.isfinite(v) and mag(v) >= threshold:
                        scr += c_edge(A_ids[k], Y_ids[i], v, _penwidth(mag(v), max_XC, ws_ay), _fmt(v, digits))
    else:
        scr += x_to_y_edges()
    return DotGraph(scr + "}\n")
