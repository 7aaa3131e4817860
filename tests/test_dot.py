"""nmfkc_dot: DOT text against the spec (nmfre.md §8, §11.1, §11.2) character for character."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dnmf import nmfkc, nmfkc_dot, nmfkc_inference
from dnmf.datasets.orthodont import load_orthodont
from dnmf.dot import DotGraph, _digits_from_threshold
from dnmf.exceptions import DnmfError, InputError

AGES = ("Age 8", "Age 10", "Age 12", "Age 14")


def _nmfre_like(C, p, *, signed=None, X=None):
    """A duck-typed NMF-RE result with the attributes nmfkc_dot reads (spec §11 values)."""
    X = np.array([[0.230772198161489], [0.240894810660416], [0.256605321793731], [0.271727669384363]]) if X is None else X
    C = np.array([C], dtype=float)
    tab = pd.DataFrame({"Basis": ["Trend1", "Trend1"], "Covariate": ["intercept", "male"], "p_value": p})
    ns = SimpleNamespace(X=X, C=C, B=C @ np.ones((2, 27)), coefficients=tab, basis_names=("Trend1",),
                         covariate_names=("intercept", "male"), feature_names=AGES)
    if signed is not None:
        ns.C_signed = signed
    return ns


def test_engine_a_vignette_edges_match_spec_11_1():
    # 2026-03 vignette (56d65eb): nmfkc.DOT(res_inf, type="YXA", sig.level=0.05)
    res = _nmfre_like([90.3934445441859, 9.60587908383286], [3.306544e-293, 8.356231e-04])
    src = nmfkc_dot(res, type="YXA", sig_level=0.05, edge_style=False).source
    edges = [ln for ln in src.splitlines() if "->" in ln and "//" not in ln]
    assert edges == [
        '  A_1 -> X_1 [label="90.39***", penwidth=5.00];',
        '  A_2 -> X_1 [label="9.61***", penwidth=0.53];',
        '  X_1 -> Y_1 [label="0.23", penwidth=4.25];',
        '  X_1 -> Y_2 [label="0.24", penwidth=4.43];',
        '  X_1 -> Y_3 [label="0.26", penwidth=4.72];',
        '  X_1 -> Y_4 [label="0.27", penwidth=5.00];',
    ]


def test_engine_b_edges_match_spec_11_2():
    X = np.array([[0.230812395272797], [0.240801738512061], [0.256734995577784], [0.271650870637359]])
    res = _nmfre_like([90.5057742127883, 9.42269696507409], [0.0, 0.002051691], signed=True, X=X)
    src = nmfkc_dot(res).source
    assert '  A_1 -> X_1 [label="90.51***", penwidth=5.00, style=solid];' in src
    assert '  A_2 -> X_1 [label="9.42**", penwidth=0.52, style=solid];' in src


EXPECTED_NMFKC = """digraph NMF {
  graph [rankdir=LR compound=true];
  splines=true; nodesep=0.4; ranksep=0.7; fontname="Arial";

  // Output variables (Y)
  subgraph cluster_Y{label="Observation (Y)" style="rounded" color="black" penwidth=1.0;
  node [shape=box, style="filled,rounded", fillcolor="lightblue", color=black, penwidth=1.5];
    Y_1 [label="Age 8"];
    Y_2 [label="Age 10"];
    Y_3 [label="Age 12"];
    Y_4 [label="Age 14"];
  }

  // Latent factors (X)
  subgraph cluster_X{label="Basis (X)" style="rounded" color="black" penwidth=1.0;
  node [shape=ellipse, style="filled,rounded", fillcolor="wheat", color=black, penwidth=1.0];
    X_1 [label="Basis1"];
  }

  // Covariates (A)
  subgraph cluster_A{label="Covariates (A)" style="rounded" color="black" penwidth=1.0;
  node [shape=box, style="filled,rounded", fillcolor="lightcoral", color=black, penwidth=1.5];
    A_1 [label="intercept"];
    A_2 [label="male"];
  }

  edge [fontname="Arial", fontsize=8, arrowhead=open];

  // A -> X edges (C)
  edge [color=black, fontcolor=black, style=solid];
  A_1 -> X_1 [label="90.14***", penwidth=5.00, style=solid];
  A_2 -> X_1 [label="10.01***", penwidth=0.56, style=solid];

  // X -> Y edges (X)
  edge [color="gray0", fontcolor="gray0", style=solid];
  X_1 -> Y_1 [label="0.23", penwidth=4.25];
  X_1 -> Y_2 [label="0.24", penwidth=4.43];
  X_1 -> Y_3 [label="0.26", penwidth=4.72];
  X_1 -> Y_4 [label="0.27", penwidth=5.00];
}
"""


@pytest.fixture(scope="module")
def orthodont_inference():
    o = load_orthodont()
    fit = nmfkc(o.Y_frame(), o.A_frame(), rank=1)
    return fit, nmfkc_inference(fit, o.Y, o.A, client=False)


def test_full_text_for_nmfkc_inference(orthodont_inference):
    # assembled from the header, cluster, node-style and edge templates of spec §8
    _, inf = orthodont_inference
    assert nmfkc_dot(inf, sig_level=0.05).source == EXPECTED_NMFKC
    assert str(nmfkc_dot(inf, sig_level=0.05)) == EXPECTED_NMFKC


def test_plain_fit_uses_threshold_and_no_stars(orthodont_inference):
    fit, _ = orthodont_inference
    src = nmfkc_dot(fit).source
    assert '  A_1 -> X_1 [label="90.14", penwidth=5.00, style=solid];' in src
    assert "***" not in src


def test_sig_level_filters_edges():
    res = _nmfre_like([90.0, 9.0], [1e-10, 0.2])
    assert "A_2 -> X_1" not in nmfkc_dot(res, sig_level=0.1).source
    # the node stays: hiding depends on the threshold, not on p-values
    assert 'A_2 [label="male"]' in nmfkc_dot(res, sig_level=0.1).source
    assert '  A_2 -> X_1 [label="9.00", penwidth=0.50, style=solid];' in nmfkc_dot(res, sig_level=None).source


def test_yx_and_ya_types():
    o = load_orthodont()
    plain = nmfkc(o.Y, rank=2, detail="fast")
    yx = nmfkc_dot(plain, type="YX").source
    assert "cluster_A" not in yx and "// X -> Y edges (X)" in yx
    assert '    X_2 [label="Basis2"];' in yx and '    Y_1 [label="Y1"];' in yx
    with pytest.raises(InputError, match="'type'"):
        nmfkc_dot(plain, type="YXA")
    fit = nmfkc(o.Y, o.A, rank=1)
    ya = nmfkc_dot(fit, type="YA").source
    XC = fit.X @ fit.C
    assert f'  A_1 -> Y_4 [label="{XC[3, 0]:.2f}", penwidth=5.00, style=solid];' in ya
    assert "cluster_X" not in ya


def test_signed_mode_hides_small_and_dashes_negative():
    X = np.array([[0.5, 0.2], [0.5, 0.8]])
    C = np.array([[2.0, -1.0, 0.001], [0.5, 0.0, -0.002]])
    res = SimpleNamespace(X=X, C=C, B=C @ np.ones((3, 4)))
    src = nmfkc_dot(res).source  # auto-detected signed (negative entries)
    assert '  A_2 -> X_1 [label="-1.00", penwidth=2.50, style=dashed];' in src
    assert "A_3" not in src  # |C[:, 2]| < 0.01: isolated, hidden
    assert '    A_1 [label="A1"];' in src and '    X_1 [label="Factor1"];' in src
    kept = nmfkc_dot(res, hide_isolated=False).source
    assert '    A_3 [label="A3"];' in kept


def test_labels_sanitised_ids_fill_and_digits():
    res = SimpleNamespace(X=np.array([[1.0]]), C=np.array([[3.14159, 2.0]]), B=np.ones((1, 5)))
    src = nmfkc_dot(res, threshold=0.001, fill=False, A_label=["a b", "c"], Y_title="Y!").source
    assert '  A_1 -> X_1 [label="3.142", penwidth=5.00, style=solid];' in src
    assert 'node [shape=box, style="rounded", color=black, penwidth=1.5];' in src
    assert 'subgraph cluster_Y{label="Y!"' in src
    assert '    A_1 [label="a b"];' in src
    assert [_digits_from_threshold(t) for t in (0.01, 0.005, 1e-5, 1.0, 0.0, 0.5)] == [2, 3, 5, 0, 2, 1]


def test_render_needs_graphviz(tmp_path, monkeypatch):
    g = DotGraph(EXPECTED_NMFKC)
    assert g.save(tmp_path / "m.dot").read_text() == EXPECTED_NMFKC
    if shutil.which("dot"):
        out = g.render(tmp_path / "m.svg", format="svg")
        assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    monkeypatch.setenv("PATH", str(tmp_path))  # an existing directory without Graphviz
    with pytest.raises(DnmfError, match="Graphviz"):
        g.render(tmp_path / "m.png", format="png")
    with pytest.raises(InputError, match="'format'"):
        g.render(tmp_path / "m.gif", format="gif")
