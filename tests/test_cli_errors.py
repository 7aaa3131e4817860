"""What a user sees when something goes wrong, and the install/README promises (issue 11).

* every failure a user can cause is one or two lines on stderr (exit 1 run/input, 2 usage/config,
  130 Ctrl-C), ``--debug`` shows the traceback;
* ``dnmf validate`` rejects what ``dnmf run`` would: k above min(m, n) (shape read cheaply from
  every input format), an unusable ``output.dir``, binary config files, duplicate YAML keys;
* a base install (no extras) runs the quickstart: anndata and h5py are base dependencies and
  pipelines import anndata only when they write or read AnnData;
* the README's Python example runs as a script;
* log lines and echo lines go through the progress bar instead of overwriting it.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import distributed
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

import dnmf
from dnmf import cli
from dnmf.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def small_job(**extra):
    """hawaiibirds (183 × 1183), k = 3, few iterations, a small LocalCluster."""
    data = {"pipeline": "factorize", "name": "small", "input": {"dataset": "hawaiibirds"},
            "model": {"k": 3, "maxit": 5, "seed": 1},
            "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "dashboard_address": None},
            "output": {"dir": "runs", "anndata": "none", "performance_report": False, "plots": False},
            "progress": "log"}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


# ---------------------------------------------------------------------------------------------
# validate rejects what run would reject
# ---------------------------------------------------------------------------------------------


def _write(kind, path, A):
    if kind == "npy":
        np.save(path, A.toarray())
    elif kind == "npz":
        sp.save_npz(path, A.tocsc())
    elif kind == "npz-array":
        np.savez(path, A.toarray())
    elif kind == "mtx":
        scipy.io.mmwrite(str(path), A)
    elif kind == "h5ad":
        import anndata

        anndata.AnnData(X=sp.csr_matrix(A.T)).write_h5ad(path)  # cells × genes
    elif kind == "zarr":
        dnmf.io.write_zarr(A, str(path), block_nnz=50)
    elif kind == "zarr-dense":
        import zarr

        zarr.open_array(str(path), mode="w", shape=A.shape, dtype="f8")[:] = A.toarray()


@pytest.mark.parametrize("kind, suffix", [("npy", ".npy"), ("npz", ".npz"), ("npz-array", ".npz"), ("mtx", ".mtx"),
                                          ("h5ad", ".h5ad"), ("zarr", ".zarr"), ("zarr-dense", ".zarr")])
def test_validate_rejects_k_above_the_smaller_dimension(kind, suffix, workdir, capsys):
    from pipelines.factorize import FactorizeInput, input_shape

    A = sp.random(12, 7, density=0.5, random_state=np.random.default_rng(1), format="csc")
    path = workdir / f"a{suffix}"
    _write(kind, path, A)
    assert input_shape(FactorizeInput(path=str(path))) == (12, 7)  # genes × cells, whatever the format
    cfg = write_config(workdir / "job.yaml", {"pipeline": "factorize", "input": {"path": str(path)},
                                              "model": {"k": 8}})
    rc, out, err = run_main(["validate", cfg], capsys)
    assert rc == 2 and out == ""
    assert err == ("dnmf: config error: The config key 'model.k' must be an int in [1, 7] (at most min(m, n) of "
                   "the 12 × 7 input). Got 8 instead.\n")
    rc, _, err = run_main(["validate", cfg, "--set", "model.k=7"], capsys)
    assert rc == 0, err


def test_validate_rejects_k_above_a_dataset_or_synthetic_shape(workdir, capsys):
    cfg = write_config(workdir / "job.yaml", small_job(model={"k": 200}))
    rc, _, err = run_main(["validate", cfg], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config key 'model.k' must be an int in [1, 183] (at most "
                               "min(m, n) of the 183 × 1183 input). Got 200 instead.\n")
    rc, _, err = run_main(["validate", cfg, "--set", "input={synthetic: {m: 50, n: 9, density: 0.5}, path: s.zarr}"],
                          capsys)
    assert rc == 2 and "must be an int in [1, 9] (at most min(m, n) of the 50 × 9 input). Got 200 instead." in err


def test_validate_rejects_an_unreadable_input(workdir, capsys):
    (workdir / "broken.npy").write_bytes(b"not a numpy file at all")
    cfg = write_config(workdir / "job.yaml", {"pipeline": "factorize", "input": {"path": "broken.npy"},
                                              "model": {"k": 2}})
    rc, _, err = run_main(["validate", cfg], capsys)
    assert rc == 2
    assert err.startswith("dnmf: config error: The config key 'input.path' must be a readable matrix file or store. "
                          "Got 'broken.npy' instead. (ValueError: ")


def test_validate_rejects_an_output_dir_that_is_a_file_or_cannot_be_created(workdir, capsys):
    (workdir / "taken").write_text("a file")
    cfg = write_config(workdir / "job.yaml", small_job())
    rc, _, err = run_main(["validate", cfg, "--set", "output.dir=taken"], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config key 'output.dir' must be a directory that exists or can "
                               f"be created. Got 'taken' instead. ('{workdir / 'taken'}' is a file)\n")
    rc, _, err = run_main(["validate", cfg, "--set", "output.dir=taken/runs/deeper"], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config key 'output.dir' must be a directory that exists or can "
                               f"be created. Got 'taken/runs/deeper' instead. (cannot create it: '{workdir / 'taken'}' "
                               "is a file)\n")
    rc, _, err = run_main(["validate", cfg, "--set", "output.dir=new/runs"], capsys)
    assert rc == 0, err
    assert not (workdir / "new").exists()  # validate creates nothing


def test_binary_and_directory_config_files(workdir, capsys):
    (workdir / "job.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    rc, _, err = run_main(["validate", "job.yaml"], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config file 'job.yaml' must be a UTF-8 text (YAML) file; "
                               "byte 0 is b'\\x89' (is it a binary file?).\n")
    (workdir / "nul.yaml").write_bytes(b"pipeline: factorize\x00\n")
    rc, _, err = run_main(["run", "nul.yaml"], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config file 'nul.yaml' must be a UTF-8 text (YAML) file; it "
                               "holds NUL bytes (is it a binary file?).\n")
    (workdir / "adir.yaml").mkdir()
    rc, _, err = run_main(["validate", "adir.yaml"], capsys)
    assert rc == 2 and err == "dnmf: config error: The config file 'adir.yaml' is a directory; give a YAML file.\n"


def test_duplicate_yaml_keys_are_rejected_with_both_lines(workdir, capsys):
    (workdir / "job.yaml").write_text("pipeline: factorize\ninput: {dataset: hawaiibirds}\nmodel:\n  k: 3\n"
                                      "  maxit: 5\n  k: 4\n")
    rc, _, err = run_main(["validate", "job.yaml"], capsys)
    assert rc == 2 and err == ("dnmf: config error: The config file 'job.yaml' gives the key 'k' twice in one mapping "
                               "(lines 4 and 6); keep one.\n")
    (workdir / "top.yaml").write_text("pipeline: factorize\nmodel: {k: 3}\ninput: {dataset: aml}\n"
                                      "input: {dataset: hawaiibirds}\n")
    rc, _, err = run_main(["validate", "top.yaml"], capsys)
    assert rc == 2 and "gives the key 'input' twice in one mapping (lines 3 and 4); keep one." in err
    # in a --set value too
    rc, _, err = run_main(["validate", "job.yaml", "--set", "cluster={kind: local, kind: slurm}"], capsys)
    assert rc == 2 and "config error:" in err
    from dnmf.config import apply_overrides

    with pytest.raises(dnmf.ConfigError) as info:
        apply_overrides({}, ["cluster={kind: local, kind: slurm}"])
    assert str(info.value) == ("The value of the override 'cluster={kind: local, kind: slurm}' gives the key 'kind' "
                               "twice in one mapping (lines 1 and 1); keep one.")
    # YAML merge keys may be overridden: not duplicates
    from dnmf.config import parse_yaml

    assert parse_yaml("a: &b {k: 3}\nmodel: {<<: *b, k: 4}\n", "x") == {"a": {"k": 3}, "model": {"k": 4}}


# ---------------------------------------------------------------------------------------------
# run: one or two lines per error, --debug for the traceback
# ---------------------------------------------------------------------------------------------


def _fail_with(monkeypatch, exc):
    def boom(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "info", boom)


@pytest.mark.parametrize("exc, expected", [
    (PermissionError(13, "Permission denied", "runs/x.zarr"),
     ["dnmf: error: Permission denied: 'runs/x.zarr' (check the file's permissions)."]),
    (OSError(28, "No space left on device", "runs/x.zarr/model/w"),
     ["dnmf: error: No space left on device: 'runs/x.zarr/model/w' (free some space or choose another output.dir)."]),
    (MemoryError(), ["dnmf: error: out of memory: lower model.block_nnz, use more workers or raise "
                     "cluster.memory_limit (model.out_of_core: true streams blocks from disk)."]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     ["dnmf: error: a file is not UTF-8 text (invalid start byte at byte 0); is it a binary file?",
      "dnmf: run `dnmf --debug COMMAND ...` for the full traceback."]),
    (ValueError("Not a Matrix Market file.\nline 2 of a long reader message"),
     ["dnmf: error: ValueError: Not a Matrix Market file.",
      "dnmf: run `dnmf --debug COMMAND ...` for the full traceback."]),
])
def test_errors_that_are_not_dnmfs_own_are_one_or_two_lines(exc, expected, monkeypatch, capsys):
    _fail_with(monkeypatch, exc)
    rc, out, err = run_main(["info", "x.zarr"], capsys)
    assert rc == 1 and out == "" and err.splitlines() == expected


def test_debug_shows_the_traceback_before_or_after_the_command(monkeypatch, capsys):
    _fail_with(monkeypatch, ValueError("reader broke"))
    for argv in (["--debug", "info", "x.zarr"], ["info", "x.zarr", "--debug"]):
        with pytest.raises(ValueError, match="reader broke"):
            main(argv)
    _fail_with(monkeypatch, dnmf.InputError("bad input"))
    with pytest.raises(dnmf.InputError):
        main(["info", "x.zarr", "--debug"])
    rc, _, err = run_main(["info", "x.zarr"], capsys)
    assert rc == 1 and err == "dnmf: error: bad input\n"


def test_keyboard_interrupt_in_process(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    rc, out, err = run_main(["info", "x.zarr"], capsys)
    assert rc == 130 and err == "dnmf: Interrupted.\n"
    monkeypatch.setitem(cli.COMMANDS, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc, out, err = run_main(["run", "x.yaml"], capsys)
    assert rc == 130 and err == "dnmf: Interrupted; `dnmf run CONFIG --resume` continues from the last checkpoint.\n"


def test_run_with_a_corrupt_matrix_is_one_line_and_exit_1(workdir):
    """A reader error (valid header, broken body) reaches the user as one line, not a traceback."""
    (workdir / "bad.mtx").write_text("%%MatrixMarket matrix coordinate real general\n5 4 3\n1 1 1.0\n2 x 2.0\n")
    cfg = write_config(workdir / "job.yaml", small_job(input={"dataset": None, "path": "bad.mtx"}, model={"k": 2},
                                                       cluster={"processes": False}))
    res = subprocess.run([sys.executable, "-m", "dnmf", "run", cfg], capture_output=True, text=True, timeout=180,
                         cwd=workdir)
    assert res.returncode == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dnmf:") and not ln.startswith("dnmf: warning:")]
    assert "Traceback" not in res.stderr and 1 <= len(errors) <= 2, res.stderr
    # the reader's own InputError (one line) or any other error (one line and the --debug hint)
    assert errors[0].startswith("dnmf: error: ") and ("bad.mtx" in errors[0] or "ValueError" in errors[0])
    assert errors[1:] in ([], ["dnmf: run `dnmf --debug COMMAND ...` for the full traceback."])


def test_ctrl_c_stops_a_run_quietly_with_exit_130(workdir):
    """Ctrl-C on a terminal signals the whole process group: dnmf and its worker processes."""
    cfg = write_config(workdir / "job.yaml", small_job(model={"maxit": 100000, "tol": 0}, checkpoint={"every": 5}))
    proc = subprocess.Popen([sys.executable, "-m", "dnmf", "run", cfg], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stderr:  # wait for the first progress line: the fit is running
            lines.append(line)
            if "dnmf.jobs: fit: " in line or time.monotonic() > deadline:
                break
        assert any("dnmf.jobs: fit: " in ln for ln in lines), "".join(lines)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        # bounded: a run that ignored the Ctrl-C fails the test instead of hanging the suite
        _, rest = proc.communicate(timeout=120)
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    after = [ln for ln in rest.splitlines() if ln.strip() and "dnmf.jobs: fit: " not in ln
             and "dnmf.engine.checkpoint: checkpoint" not in ln]
    assert rc == 130, rest
    assert "dnmf: Interrupted; `dnmf run CONFIG --resume` continues from the last checkpoint." in after
    assert "Traceback" not in rest and len(after) < 5, rest


class _LevelAtTeardown(distributed.WorkerPlugin):
    """Worker plugin: writes the worker's ``distributed`` logger level to a file when the worker
    closes, i.e. while the cluster shuts down."""

    def __init__(self, folder: str):
        self.folder = folder

    def teardown(self, worker):
        level = logging.getLogger("distributed").getEffectiveLevel()
        name = re.sub(r"\W", "_", worker.address)
        pathlib.Path(self.folder, f"{name}.level").write_text(str(level))


def test_a_cluster_started_for_a_run_closes_with_its_loggers_silenced(tmp_path):
    """A run that fails (a damaged checkpoint) closed its LocalCluster while a worker's heartbeat
    met the closed scheduler, and the worker's traceback reached the run's stderr (a loaded CI
    run). The cluster ``connect`` started is closed with the cluster machinery's loggers silenced
    on its workers and here; this process's levels are restored afterwards."""
    from dnmf.config import LocalClusterConfig
    from dnmf.jobs.cluster import SHUTDOWN_LOGGERS, connect

    before = {name: logging.getLogger(name).level for name in SHUTDOWN_LOGGERS}
    cfg = LocalClusterConfig(n_workers=2, threads_per_worker=1, dashboard_address=None)
    with connect(cfg, echo=lambda msg: None) as client:
        client.register_plugin(_LevelAtTeardown(str(tmp_path)), name="dnmf-test-level-at-teardown")
        assert len(client.scheduler_info()["workers"]) == 2
    levels = sorted(int(p.read_text()) for p in tmp_path.glob("*.level"))
    assert len(levels) == 2 and all(level > logging.CRITICAL for level in levels), levels
    assert {name: logging.getLogger(name).level for name in SHUTDOWN_LOGGERS} == before


# ---------------------------------------------------------------------------------------------
# Base install and the README
# ---------------------------------------------------------------------------------------------


def test_anndata_and_h5py_are_base_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert {"anndata", "h5py"} <= names
    assert project["optional-dependencies"]["anndata"] == []  # kept as an alias: dnmf[anndata] still installs


def test_factorize_without_anndata_when_no_anndata_is_involved(workdir):
    """The pipeline imports anndata only to read or write AnnData: a run without it needs none."""
    cfg = write_config(workdir / "job.yaml", small_job(cluster={"processes": False}))
    code = ("import sys; sys.modules['anndata'] = None; from dnmf.cli import main; "
            f"rc = main(['run', {cfg!r}, '--progress', 'none']); "
            "assert 'anndata' not in [m for m in sys.modules if sys.modules[m] is not None], 'imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert (workdir / "runs" / "small.zarr").is_dir()


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_python_example_runs_as_a_script(workdir):
    code = readme_python_example()
    assert 'if __name__ == "__main__":' in code  # LocalCluster's worker processes re-import the script
    (workdir / "example.py").write_text(code)
    env = {**os.environ, "DASK_DISTRIBUTED__DASHBOARD__ADDRESS": ":0", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, timeout=300, cwd=workdir,
                         env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("(200, 5) (5,) (5, 80) ")
    assert lines[1].endswith(" distributed")
    assert lines[2].startswith("(1183, 8) (183, 8) ")
    assert (workdir / "sim.zarr").is_dir()


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && dnmf run configs/quickstart.yaml" in readme
    assert 'pip install -e ".[test]" && python -m pytest -q -n 2' in readme
    # the two lines in order in one fresh venv: the quickstart runs on the base install, before
    # the test extras are installed, so that they cannot hide a missing base dependency
    steps = ["python3 -m venv --clear .venv-ci", "pip install -q -e .\n", "dnmf\" run \"$ROOT/configs/quickstart.yaml\"",
             'pip install -q -e ".[test]"', "\npython -m pytest -q -n 2\n"]
    at = [ci.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
    assert "set -euo pipefail" in ci


# ---------------------------------------------------------------------------------------------
# Progress: log lines and echo lines go through the bar
# ---------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_do_not_overwrite_the_bar():
    from dnmf.jobs import progress

    term = Terminal()
    handler = progress.ProgressHandler(term)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("dnmf.test_progress")
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)
    with progress.Progress("fit", 3, stream=term) as bar:
        bar.set(1, "loss 9")
        log.info("checkpoint saved")
        progress.write("a line for the user", term)
        bar.set(2, "loss 8")
    out = term.getvalue()
    # each line is written on a cleared line and followed by the bar, redrawn
    assert "\r\033[KINFO checkpoint saved\n\rfit |" in out
    assert "\r\033[Ka line for the user\n\rfit |" in out
    screen = [ln.split("\r")[-1].replace("\033[K", "") for ln in out.split("\n")]
    assert screen[0] == "INFO checkpoint saved" and screen[1] == "a line for the user"
    assert screen[2].startswith("fit |") and "3/3" not in screen[2] and "2/3 it" in screen[2]
    # without a bar: plain lines, no control characters
    plain = io.StringIO()
    progress.write("hello", plain)
    assert plain.getvalue() == "hello\n"
    log.handlers[:] = []


def test_close_all_ends_a_bar_left_open_by_an_error():
    from dnmf.jobs import progress

    term = Terminal()
    bar = progress.Progress("fit", 5, stream=term)
    bar.set(2)
    progress.close_all()
    assert term.getvalue().endswith("\n")
    progress.write("dnmf: error: ...", term)
    assert term.getvalue().endswith("\ndnmf: error: ...\n")  # not redrawn after it


def test_worker_preload_ignores_ctrl_c_and_drops_compute_failed_records():
    """`dnmf run` preloads dnmf.cli into its workers: Ctrl-C is the dnmf process's, and a failed
    task's multi-line "Compute Failed" record is dropped (dnmf reports the error in one line)."""
    code = ("import logging, signal; from dnmf import cli; cli.dask_setup(None); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN); "
            "log = logging.getLogger('distributed.worker'); "
            "rec = lambda msg: log.makeRecord(log.name, logging.ERROR, 'f', 1, msg, (), None); "
            "print(log.filter(rec('Compute Failed\\nKey: x')), log.filter(rec('Worker memory')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "False", "True"]
