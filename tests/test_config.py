"""Job configs: validation into frozen dataclasses, one clear ConfigError per problem, round trips.

Every error class of DESIGN §7 / CONVENTIONS §14 has a test asserting its full message:
unknown keys, wrong types, missing required keys, missing input files, impossible values,
memory limits that cannot hold one block, unknown pipelines and kinds, bad YAML and bad
``--set`` overrides.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import dnmf
from dnmf.config import (
    JobConfig,
    JobqueueClusterConfig,
    LocalClusterConfig,
    apply_overrides,
    describe_section,
    load_config,
    parse_nbytes,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a small matrix file (relative config paths start here)."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "a.npy", np.arange(20.0).reshape(5, 4))
    return tmp_path


BASE = {"pipeline": "factorize", "input": {"path": "a.npy"}, "model": {"k": 3}}
NMFRE = {"pipeline": "nmfre", "input": {"dataset": "orthodont"}}


def error_of(data: dict, overrides=()) -> str:
    with pytest.raises(dnmf.ConfigError) as info:
        JobConfig.from_dict(apply_overrides(data, overrides))
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The example configs
# ---------------------------------------------------------------------------------------------


def test_example_configs_ship():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "orthodont_nmfre.yaml", "big_synthetic.yaml",
                                         "slurm.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates_and_round_trips(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert cfg.name == path.stem or path.name == "slurm.yaml"
    # from_dict(to_dict(c)) == c, also through YAML text (what a run stores)
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    assert JobConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    # the resolved config lists every key, defaults filled in
    assert set(cfg.to_dict()) == {"pipeline", "name", *dict(cfg.sections), "cluster", "checkpoint", "output",
                                  "progress"}


def test_example_values_are_read_as_given(monkeypatch):
    monkeypatch.chdir(ROOT)
    q = load_config(ROOT / "configs" / "quickstart.yaml")
    assert (q.pipeline, q.input.dataset, q.model.k, q.model.tol, q.model.seed) == ("factorize", "pbmc3k", 10, 1e-4, 1)
    assert q.cluster == LocalClusterConfig(n_workers=2, threads_per_worker=1, memory_limit="2GiB")
    assert q.store_path == pathlib.Path("runs/quickstart.zarr")
    s = load_config(ROOT / "configs" / "slurm.yaml")
    assert isinstance(s.cluster, JobqueueClusterConfig)
    assert (s.cluster.kind, s.cluster.cores, s.cluster.processes, s.cluster.jobs) == ("slurm", 8, 2, 4)
    o = load_config(ROOT / "configs" / "orthodont_nmfre.yaml")
    assert (o.model.rank, o.model.df_rate, o.model.prefix, o.inference.wild_B) == (1, 0.2, "Trend", 500)
    assert o.scan.rates == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_configs_are_frozen(workdir):
    cfg = JobConfig.from_dict(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.k = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"


def test_defaults_and_lenient_scalars(workdir):
    cfg = JobConfig.from_dict(apply_overrides(BASE, ["model.tol=1e-6", "model.L1=0.5", "model.nonneg=[true, false]"]))
    # YAML 1.1 reads 1e-6 as a string; float keys accept numeric strings
    assert cfg.model.tol == 1e-6 and isinstance(cfg.model.tol, float)
    assert cfg.model.L1 == (0.5, 0.5)  # a scalar penalty is recycled to both sides
    assert cfg.model.nonneg == (True, False)
    assert cfg.name == "factorize"  # no name and no file: the pipeline's name
    assert cfg.cluster == LocalClusterConfig() and cfg.checkpoint.every == 10 and cfg.progress == "auto"
    assert cfg.output.dir == "runs" and cfg.output.anndata == "h5ad"


# ---------------------------------------------------------------------------------------------
# One test per error class, with the message text
# ---------------------------------------------------------------------------------------------


def _model_keys() -> str:
    """The factorize ``model:`` keys in order: those of dnmf.params.NMF_PARAMS with config=True."""
    from dnmf.params import NMF_PARAMS

    return ", ".join(repr(p.name) for p in NMF_PARAMS if p.config)


def test_unknown_keys(workdir):
    assert error_of(BASE, ["model.maxiter=3"]) == (
        f"The config key 'model.maxiter' is not recognized. Allowed keys under 'model': {_model_keys()}. "
        "Got 'maxiter' instead. Did you mean 'maxit'?")
    assert error_of(BASE, ["foo=1"]) == (
        "The config key 'foo' is not recognized. Allowed keys at the top level: 'pipeline', 'name', 'input', "
        "'model', 'cluster', 'checkpoint', 'output', 'progress'. Got 'foo' instead.")
    # keys of another cluster kind are unknown for this kind
    assert error_of(BASE, ["cluster={kind: local, address: 'tcp://x:1'}"]) == (
        "The config key 'cluster.address' is not recognized. Allowed keys under 'cluster': 'kind', 'n_workers', "
        "'threads_per_worker', 'memory_limit', 'processes', 'dashboard_address', 'local_directory'. "
        "Got 'address' instead.")
    assert error_of(NMFRE, ["inference.B=10"]).startswith(
        "The config key 'inference.B' is not recognized. Allowed keys under 'inference': 'enabled', 'wild_B', ")


def test_unknown_key_carries_its_parts(workdir):
    with pytest.raises(dnmf.ConfigError) as info:
        JobConfig.from_dict(apply_overrides(BASE, ["model.kk=3"]))
    assert info.value.key == "model.kk" and info.value.got == "kk"
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError too


@pytest.mark.parametrize("override, message", [
    ("model.k=ten", "The config key 'model.k' must be an int in [1, inf). Got 'ten' instead."),
    ("model.k=2.5", "The config key 'model.k' must be an int in [1, inf). Got 2.5 instead."),
    ("model.k=true", "The config key 'model.k' must be an int in [1, inf). Got True instead."),
    ("model.tol=[1]", "The config key 'model.tol' must be a float in [0.0, inf). Got [1] instead."),
    ("model.nonneg=1", "The config key 'model.nonneg' must be true or false. Got 1 instead."),
    ("output.plots=maybe", "The config key 'output.plots' must be true or false. Got 'maybe' instead."),
    ("model=3", f"The config key 'model' must be a mapping with keys {_model_keys()}. Got 3 instead."),
    ("model.L1=[0.1]", "The config key 'model.L1' must be a float in [0.0, 1.0) or a list of two such values "
                       "[W side, H side]. Got [0.1] instead."),
    ("cluster.memory_limit=lots", "The config key 'cluster.memory_limit' must be a memory size (an int number of "
                                  "bytes or a string such as '4 GiB') or 'auto'. Got 'lots' instead."),
    ("name=my run", "The config key 'name' must be a run name of letters, digits, '.', '_' or '-' (it names the "
                    "output files). Got 'my run' instead."),
])
def test_wrong_types(workdir, override, message):
    assert error_of(BASE, [override]) == message


@pytest.mark.parametrize("override, message", [
    ("model.k=0", "The config key 'model.k' must be an int in [1, inf). Got 0 instead."),
    ("model.tol=-1", "The config key 'model.tol' must be a float in [0.0, inf). Got -1 instead."),
    ("model.maxit=0", "The config key 'model.maxit' must be an int in [1, inf). Got 0 instead."),
    ("model.seed=-1", "The config key 'model.seed' must be an int in [0, inf) or null. Got -1 instead."),
    ("model.L2=[0, -2]", "The config key 'model.L2' must be a float in [0.0, inf). Got -2 instead."),
    ("model.norm=L3", "The config key 'model.norm' must be one of 'L1', 'L2', 'none'. Got 'L3' instead."),
    ("model.init=nndsvd", "The config key 'model.init' must be one of 'random', 'svd', 'lanczos', 'irlba', "
                          "'randomized'. Got 'nndsvd' instead."),
    ("cluster.n_workers=0", "The config key 'cluster.n_workers' must be an int in [1, inf) or null. Got 0 instead."),
    ("cluster.kind=k8s", "The config key 'cluster.kind' must be one of 'local', 'address', 'slurm', 'pbs'. "
                         "Got 'k8s' instead."),
    ("checkpoint.every=0", "The config key 'checkpoint.every' must be an int in [1, inf). Got 0 instead."),
    ("progress=fancy", "The config key 'progress' must be one of 'auto', 'bar', 'log', 'none'. Got 'fancy' instead."),
    ("output.anndata=loom", "The config key 'output.anndata' must be one of 'h5ad', 'zarr', 'none'. "
                            "Got 'loom' instead."),
    ("cluster={kind: slurm, walltime: 2h}", "The config key 'cluster.walltime' must be a wall time such as "
                                            "'01:30:00' or '2-00:00:00'. Got '2h' instead."),
    ("cluster={kind: slurm, cores: 2, processes: 4}", "The config key 'cluster.processes' must be an int in [1, 2] "
                                                      "(at most one worker per core of the job). Got 4 instead."),
    ("cluster={kind: address, address: 'not an address'}", "The config key 'cluster.address' must be a scheduler "
                                                           "address such as 'tcp://10.0.0.5:8786'. "
                                                           "Got 'not an address' instead."),
    ("pipeline=cnmf", "The config key 'pipeline' must be one of 'consensus', 'cv', 'factorize', 'guided', 'nmfre'. Got 'cnmf' instead."),
])
def test_impossible_values(workdir, override, message):
    assert error_of(BASE, [override]) == message


@pytest.mark.parametrize("overrides, message", [
    (["model.df_rate=0"], "The config key 'model.df_rate' must be 'scan' or a float in (0.0, inf). Got 0 instead."),
    (["scan.rates=[]"], "The config key 'scan.rates' must be a non-empty list. Got [] instead."),
    (["scan.rates=[0.1, -1]"], "The config key 'scan.rates[1]' must be a float in (0.0, inf). Got -1 instead."),
    (["inference.level=1.5"], "The config key 'inference.level' must be a float in (0.0, 1.0]. Got 1.5 instead."),
    (["inference.wild_B=1"], "The config key 'inference.wild_B' must be an int in [2, inf). Got 1 instead."),
    (["model.df_rate=scan", "scan.enabled=false"], "The config key 'model.df_rate' must be a float in (0.0, inf) "
                                                   "when scan.enabled is false. Got 'scan' instead."),
    (["input.dataset=iris"], "The config key 'input.dataset' must be one of 'orthodont' or null. Got 'iris' instead."),
])
def test_impossible_values_nmfre(workdir, overrides, message):
    assert error_of(NMFRE, overrides) == message


def test_missing_required_keys(workdir):
    assert error_of({"pipeline": "factorize", "input": {"path": "a.npy"}}) == (
        "The config key 'model.k' is missing: it must be an int in [1, inf) (rank).")
    assert error_of({"input": {"path": "a.npy"}}) == (
        "The config key 'pipeline' is missing: it must be one of 'consensus', 'cv', 'factorize', 'guided', 'nmfre'.")
    assert error_of(BASE, ["cluster={kind: address}"]) == (
        "The config key 'cluster.address' is missing: it must be a scheduler address such as "
        "'tcp://10.0.0.5:8786' (scheduler address).")
    assert error_of(BASE, ["input.synthetic={m: 10, n: 10}", "input.path=x.zarr"]) == (
        "The config key 'input.synthetic.density' is missing: it must be a float in (0.0, 1.0] "
        "(fraction of stored entries).")
    assert error_of({"pipeline": "factorize", "model": {"k": 2}}) == (
        "The config key 'input' must be a mapping with exactly one of 'dataset', 'path' or 'synthetic' "
        "(with 'path'). Got {} instead.")


def test_missing_input_files(workdir):
    assert error_of(BASE, ["input.path=data/nope.mtx"]) == (
        "The config key 'input.path' must be an existing file or directory. Got 'data/nope.mtx' instead.")
    msg = error_of(NMFRE, ["input.dataset=null", "input.Y=y.csv"])
    assert msg == (f"The config key 'input.Y' must be an existing file or directory or null. Got 'y.csv' instead. "
                   f"(no such file or directory: '{workdir / 'y.csv'}')")
    (workdir / "notes.txt").write_text("x")
    assert error_of(BASE, ["input.path=notes.txt"]) == (
        "The config key 'input.path' must be a matrix file or store ending in .mtx, .mtx.gz, .npz, .npy, .h5ad, "
        ".zarr. Got 'notes.txt' instead.")
    # a synthetic input's path is generated, so it need not exist (but must be a .zarr store)
    JobConfig.from_dict(apply_overrides(BASE, ["input.synthetic={m: 10, n: 10, density: 0.5}",
                                               "input.path=gen.zarr"]))
    assert error_of(BASE, ["input.synthetic={m: 10, n: 10, density: 0.5}", "input.path=gen.h5"]) == (
        "The config key 'input.path' must be a path ending in '.zarr' (the generated store). Got 'gen.h5' instead.")


def test_memory_limit_that_cannot_hold_one_block(workdir):
    # block_nnz: null is the library's default, at least 1,000,000 entries per block × 4 bytes
    # (float32) = 4,000,000 B = 3.81 MiB at the very least
    assert error_of(BASE, ["cluster.memory_limit=1MB"]) == (
        "The config key 'cluster.memory_limit' must be at least 3.81 MiB to hold one block (model.block_nnz = "
        "null: the library's default is at least 1000000 stored entries × 4 bytes; set a smaller model.block_nnz "
        "or raise the limit). Got '1MB' instead.")
    assert error_of(BASE, ["cluster.memory_limit=1MB", "model.block_nnz=1000000"]) == (
        "The config key 'cluster.memory_limit' must be at least 3.81 MiB to hold one block (model.block_nnz = "
        "1000000 stored entries × 4 bytes at least; lower model.block_nnz or raise the limit). Got '1MB' instead.")
    # the same limit is fine for smaller blocks: 100,000 × 4 B = 400 kB < 1 MB
    JobConfig.from_dict(apply_overrides(BASE, ["cluster.memory_limit=1MB", "model.block_nnz=100000"]))
    # SLURM: memory per job / processes per job is each worker's share (6 MB / 2 = 3 MB = 2.86 MiB)
    assert error_of(BASE, ["cluster={kind: slurm, cores: 2, processes: 2, memory: 6MB}",
                           "model.block_nnz=1000000"]) == (
        "The config key 'cluster.memory' must be at least 3.81 MiB per worker (memory / processes = 2.86 MiB) to "
        "hold one block (model.block_nnz = 1000000 stored entries × 4 bytes at least; lower model.block_nnz or "
        "raise the limit). Got '6MB' instead.")


def test_duplicate_keys_and_binary_files(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("pipeline: factorize\nmodel:\n  k: 3\n  tol: 1.0e-4\n  k: 5\n")
    with pytest.raises(dnmf.ConfigError) as info:
        load_config(dup)
    assert str(info.value) == f"The config file '{dup}' gives the key 'k' twice in one mapping (lines 3 and 5); keep one."
    binary = tmp_path / "job.yaml"
    binary.write_bytes(b"pipeline: factorize\n\xff\xfe")
    with pytest.raises(dnmf.ConfigError) as info:
        load_config(binary)
    assert str(info.value) == (f"The config file '{binary}' must be a UTF-8 text (YAML) file; byte 20 is b'\\xff' "
                               "(is it a binary file?).")


def test_output_dir_must_be_usable(workdir):
    (workdir / "f").write_text("x")
    assert error_of(BASE, ["output.dir=f"]) == (
        "The config key 'output.dir' must be a directory that exists or can be created. Got 'f' instead. "
        f"('{workdir / 'f'}' is a file)")
    assert error_of(BASE, ["output.dir=f/sub"]) == (
        "The config key 'output.dir' must be a directory that exists or can be created. Got 'f/sub' instead. "
        f"(cannot create it: '{workdir / 'f'}' is a file)")


def test_k_must_not_exceed_the_input(workdir):
    # a.npy is 5 × 4: its header is read, not its values
    assert error_of(BASE, ["model.k=5"]) == (
        "The config key 'model.k' must be an int in [1, 4] (at most min(m, n) of the 5 × 4 input). Got 5 instead.")
    JobConfig.from_dict(apply_overrides(BASE, ["model.k=4"]))


def test_config_file_errors(tmp_path):
    with pytest.raises(dnmf.ConfigError, match=r"^The config file '.*missing\.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: factorize\nmodel: {k: 3\n")
    with pytest.raises(dnmf.ConfigError, match=r"^The config file '.*bad\.yaml' is not valid YAML: "):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(dnmf.ConfigError) as info:
        load_config(lst)
    assert str(info.value) == f"The config file '{lst}' must hold a mapping of keys to values. Got [1, 2] instead."


def test_override_errors_and_values():
    with pytest.raises(dnmf.ConfigError) as info:
        apply_overrides(BASE, ["model.maxit"])
    assert str(info.value) == ("An override must be KEY=VALUE with a dotted key, e.g. 'model.maxit=3'. "
                               "Got 'model.maxit' instead.")
    with pytest.raises(dnmf.ConfigError) as info:
        apply_overrides(BASE, ["model.k.x=3"])
    assert str(info.value) == "The config key 'model.k' must be a mapping to set 'model.k.x' inside it. Got 3 instead."
    out = apply_overrides(BASE, ["model.maxit=3", "model.L1=[0.1, 0]", "cluster.n_workers=2", "name=x"])
    assert out["model"] == {"k": 3, "maxit": 3, "L1": [0.1, 0]} and out["cluster"] == {"n_workers": 2}
    assert BASE["model"] == {"k": 3}  # the input mapping is not modified


def test_load_config_uses_file_stem_and_overrides(workdir):
    p = workdir / "myjob.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["model.k=4", "output.dir=out"])
    assert cfg.name == "myjob" and cfg.model.k == 4
    assert cfg.store_path == pathlib.Path("out/myjob.zarr")


def test_parse_nbytes():
    assert parse_nbytes("2GiB") == 2 * 2**30 and parse_nbytes("500 MB") == 500_000_000 and parse_nbytes(1024) == 1024
    for bad in ("lots", 0, -5, True, 1.5):
        with pytest.raises(ValueError):
            parse_nbytes(bad)


def test_explain_lists_every_key_with_its_default():
    from pipelines import get_pipeline

    lines = describe_section(get_pipeline("factorize").SECTIONS["model"], "model")
    assert lines[0] == "model.k: an int in [1, inf) (required) — rank"
    assert "model.tol: a float in [0.0, inf) (default 0.0001) — relative loss change that stops the fit" in lines
    assert len(lines) == len(dataclasses.fields(get_pipeline("factorize").SECTIONS["model"]))


# ---------------------------------------------------------------------------------------------
# Round trips on generated configs
# ---------------------------------------------------------------------------------------------

_pos_float = st.floats(min_value=0.0, max_value=1e3, allow_nan=False)
_l1 = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)  # nmf's (RcppML's) [0, 1)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 200), tol=_pos_float, maxit=st.integers(1, 10_000), seed=st.integers(0, 2**32),
    l1=st.one_of(_l1, st.tuples(_l1, _l1)), norm=st.sampled_from(["L1", "L2", "none"]),
    ooc=st.sampled_from(["auto", True, False]),
    cluster=st.one_of(
        st.builds(dict, kind=st.just("local"), n_workers=st.one_of(st.none(), st.integers(1, 64)),
                  memory_limit=st.sampled_from(["auto", "4GiB", 8 * 2**30])),
        st.builds(dict, kind=st.sampled_from(["slurm", "pbs"]), cores=st.integers(2, 64),
                  processes=st.integers(1, 2), memory=st.sampled_from(["64GiB", "100 GB"]),
                  job_extra_directives=st.lists(st.text("abc-=", min_size=1), max_size=3)),
        st.builds(dict, kind=st.just("address"), address=st.just("tcp://10.1.2.3:8786")),
    ),
)
def test_round_trip_property(k, tol, maxit, seed, l1, norm, ooc, cluster):
    data = {"pipeline": "factorize", "name": "prop",
            "input": {"synthetic": {"m": 300, "n": 200, "density": 0.5}, "path": "prop.zarr"},
            "model": {"k": k, "tol": tol, "maxit": maxit, "seed": seed, "L1": list(l1) if isinstance(l1, tuple) else l1,
                      "norm": norm, "out_of_core": ooc},
            "cluster": cluster}
    cfg = JobConfig.from_dict(data)
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    assert JobConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.model.L1 == (tuple(l1) if isinstance(l1, tuple) else (l1, l1))

