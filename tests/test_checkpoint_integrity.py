"""Damaged and edited checkpoints, failed and interrupted runs, maxit extension, the report.

Every test works on real run stores on disk. A module fixture makes one *interrupted* run of
the factorize pipeline (Ctrl-C at iteration 5 of 8, checkpoints every 2 iterations: slot0
holds iteration 2, slot1 iteration 4 and is the valid one) and one uninterrupted reference
run; each test damages a copy of the interrupted store and resumes it through
:func:`dnmf.jobs.run_job` or the ``dnmf`` command. The loop is deterministic given its state,
so any valid resumption ends bitwise at the reference factors.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dnmf
from dnmf.config import JobConfig
from dnmf.engine.checkpoint import CheckpointError
from dnmf.jobs import RunStore, run_job
from dnmf.jobs import runner as runner_mod

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.ConvergenceWarning")

MAXIT = 8
STOP_AT = 5  # Ctrl-C here: checkpoints at 2 (slot0) and 4 (slot1, the valid slot)


def quiet(msg):
    pass


def config_data(root: pathlib.Path, name: str, **model) -> dict:
    return {"pipeline": "factorize", "name": name,
            "input": {"synthetic": {"m": 300, "n": 400, "density": 0.05, "k": 4, "seed": 5, "block_nnz": 1000},
                      "path": str(root / "input.zarr")},
            "model": {"k": 4, "maxit": MAXIT, "tol": 0, "seed": 3, "block_nnz": 1000, **model},
            "checkpoint": {"every": 2},
            "output": {"dir": str(root / "runs"), "plots": False, "performance_report": False},
            "progress": "none"}


def config(root, name="job", **model) -> JobConfig:
    return JobConfig.from_dict(config_data(root, name, **model))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(dir, reference model group, interrupted store template)."""
    root = tmp_path_factory.mktemp("made")
    ref = run_job(config(root, "ref"), client=False, echo=quiet)
    original = runner_mod.Job.iteration_callback

    def interrupting(self, bar):
        cb = original(self, bar)

        def on_iteration(record):
            cb(record)
            if record.iteration == STOP_AT:
                raise KeyboardInterrupt

        return on_iteration

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_mod.Job, "iteration_callback", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run_job(config(root, "job"), client=False, echo=quiet)
    return root, RunStore.open(ref.store).read_group("model"), root / "runs" / "job.zarr"


@pytest.fixture
def work(made, tmp_path, monkeypatch):
    """A copy of the interrupted store in tmp_path/runs/job.zarr (same input)."""
    root, ref, template = made
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(template, tmp_path / "runs" / "job.zarr")
    data = config_data(root, "job")
    data["output"]["dir"] = str(tmp_path / "runs")
    return tmp_path / "runs" / "job.zarr", JobConfig.from_dict(data), ref


def ckpt(store: pathlib.Path) -> pathlib.Path:
    return store / "checkpoint" / "nmf"


def edit_attrs(zarr_json: pathlib.Path, **values):
    doc = json.loads(zarr_json.read_text())
    doc["attributes"].update(values)
    zarr_json.write_text(json.dumps(doc))


def assert_reference(store_path, ref):
    model = RunStore.open(store_path).read_group("model")
    for key in ("w", "d", "h", "loss_history"):
        np.testing.assert_array_equal(model[key], ref[key])  # deterministic loop: bitwise
    assert model["iter"] == MAXIT


def resume_with_warning(cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="dnmf.engine.checkpoint"):
        res = run_job(cfg, resume=True, client=False, echo=quiet)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dnmf.engine.checkpoint"]
    assert len(warnings) == 1
    return res, warnings[0]


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "dnmf", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------
# Interrupted and failed runs
# ---------------------------------------------------------------------------------------------


def test_interrupted_run_is_marked_resumable_and_resumes_exactly(work):
    store, cfg, ref = work
    rs = RunStore.open(store)
    assert rs.status == "interrupted" and not rs.is_complete and rs.meta["error"] == "KeyboardInterrupt"
    assert rs.checkpoint_iterations() == {"nmf": 4} and not (store / "model").exists()
    with pytest.raises(dnmf.DnmfError, match=r"An interrupted run exists at .* \(status 'interrupted'\)\. "
                                             r"Pass --resume"):
        run_job(cfg, client=False, echo=quiet)
    lines = []
    res = run_job(cfg, resume=True, client=False, echo=lines.append)
    assert f"resuming the interrupted run at {store}" in lines
    assert_reference(res.store, ref)
    rs = RunStore.open(store)
    assert rs.is_complete and rs.meta["attempts"] == 2 and rs.verify() == []


def test_an_edited_status_does_not_make_a_run_complete(work):
    store, cfg, _ = work
    edit = json.loads((store / "zarr.json").read_text())
    edit["attributes"]["dnmf_run"]["status"] = "complete"
    (store / "zarr.json").write_text(json.dumps(edit))
    assert not RunStore.open(store).is_complete  # no completion marker for this attempt
    with pytest.raises(dnmf.DnmfError, match=r"An interrupted run exists at .* \(status 'complete, without its "
                                             r"completion marker'\)"):
        run_job(cfg, client=False, echo=quiet)


def test_run_left_running_by_a_dead_process_before_its_first_checkpoint_restarts(made, tmp_path, monkeypatch):
    root, _, _ = made
    monkeypatch.chdir(tmp_path)
    data = config_data(root, "job")
    data["output"]["dir"] = str(tmp_path / "runs")
    cfg = JobConfig.from_dict(data)
    store = RunStore.create(cfg.store_path, {"pipeline": "factorize", "name": "job", "config": cfg.to_dict()})
    assert not store.is_stale()  # this process is alive: the run may be going on
    with pytest.raises(dnmf.DnmfError, match=r"\(status 'running'\)"):
        run_job(cfg, client=False, echo=quiet)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.update_meta(owner={**store.meta["owner"], "pid": gone.pid})  # as if SIGKILLed before a checkpoint
    assert store.is_stale()
    lines = []
    res = run_job(cfg, client=False, echo=lines.append)
    assert lines[0] == (f"the run at {cfg.store_path} stopped before its first checkpoint (status 'running'); "
                        "starting it again")
    assert RunStore.open(res.store).is_complete


def test_run_failing_before_its_first_iteration_does_not_block_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = np.random.default_rng(0).random((60, 50))
    a[3, 4] = -1.0  # refused by the data checks, before the loop
    np.savez(tmp_path / "a.npz", a)
    data = {"pipeline": "factorize", "name": "job", "input": {"path": str(tmp_path / "a.npz")},
            "model": {"k": 3, "maxit": 3, "seed": 1}, "checkpoint": {"every": 1},
            "output": {"dir": str(tmp_path / "runs"), "plots": False, "performance_report": False},
            "progress": "none"}
    with pytest.raises(dnmf.InputError, match="negative"):
        run_job(JobConfig.from_dict(data), client=False, echo=quiet)
    store = RunStore.open(tmp_path / "runs" / "job.zarr")
    assert store.status == "failed" and store.meta["error"].startswith("InputError: ") and not store.has_progress()
    a[3, 4] = 1.0
    np.savez(tmp_path / "a.npz", a)
    lines = []
    res = run_job(JobConfig.from_dict(data), client=False, echo=lines.append)  # no --resume, no --overwrite
    assert lines[0] == (f"the run at {tmp_path / 'runs' / 'job.zarr'} stopped before its first checkpoint "
                        "(status 'failed'); starting it again")
    model = RunStore.open(res.store).read_group("model")
    ref = dnmf.nmf(a, 3, maxit=3, seed=1, client=False)
    np.testing.assert_array_equal(model["w"], ref.w)  # same data, seed and blocks: bitwise the direct fit


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: fall back to the other slot, or one clear error
# ---------------------------------------------------------------------------------------------


def test_missing_w_chunk_falls_back_to_the_other_slot(work, caplog):
    store, cfg, ref = work
    (ckpt(store) / "slot1" / "w" / "c" / "0" / "0").unlink()
    res, warning = resume_with_warning(cfg, caplog)
    assert warning == (f"checkpoint {ckpt(store)}: slot1: 1 of 1 chunk(s) missing in 'w'; "
                       "resuming from slot0 (iteration 2) instead")
    assert_reference(res.store, ref)  # never W = 0: the run redid iterations 3-8


def test_missing_chunks_in_both_slots_are_refused_with_one_message(work):
    store, cfg, _ = work
    for slot in ("slot0", "slot1"):
        (ckpt(store) / slot / "w" / "c" / "0" / "0").unlink()
    with pytest.raises(CheckpointError) as info:
        run_job(cfg, resume=True, client=False, echo=quiet)
    assert str(info.value) == (
        f"Cannot resume the run at '{store}': its checkpoint 'checkpoint/nmf' is damaged and no slot holds a valid "
        "state to resume from (slot1: 1 of 1 chunk(s) missing in 'w'; slot0: 1 of 1 chunk(s) missing in 'w'). "
        "Pass --overwrite to start over.")
    rs = RunStore.open(store)
    assert rs.status == "failed" and not rs.is_complete and not (store / "model").exists()
    res = run_job(cfg, overwrite=True, client=False, echo=quiet)
    assert RunStore.open(res.store).is_complete


def test_garbage_chunk_and_missing_slot_give_one_cli_error(work):
    store, cfg, _ = work
    cfg_path = store.parent.parent / "job.yaml"
    cfg_path.write_text(cfg.to_yaml())
    (ckpt(store) / "slot1" / "h" / "0" / "c" / "0" / "0").write_bytes(b"\x00garbage" * 50)
    shutil.rmtree(ckpt(store) / "slot0")
    res = run_cli(["run", str(cfg_path), "--resume"], store.parent.parent)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dnmf: error: Cannot resume the run at '{store}': its checkpoint 'checkpoint/nmf' is "
                           "damaged and no slot holds a valid state to resume from (slot1: unreadable (")
    assert last.endswith("; slot0: missing). Pass --overwrite to start over.")
    assert "Traceback" not in res.stderr


def test_garbage_bytes_of_the_same_length_fail_the_checksum(work, caplog):
    store, cfg, ref = work
    chunk = ckpt(store) / "slot1" / "d" / "c" / "0"
    raw = np.frombuffer(chunk.read_bytes(), dtype=np.uint8).copy()
    raw[-1] ^= 0xFF  # one flipped byte: still a decodable chunk
    chunk.write_bytes(raw.tobytes())
    res, warning = resume_with_warning(cfg, caplog)
    assert warning.startswith(f"checkpoint {ckpt(store)}: slot1: ")
    assert warning.endswith("resuming from slot0 (iteration 2) instead")
    assert_reference(res.store, ref)


def test_checkpoint_with_compressed_arrays_resumes_exactly(work, caplog):
    # Checkpoints store their arrays uncompressed; those of earlier dnmf versions are Zstandard
    # compressed (Zarr's default). Each array of the valid slot rewritten so, with the same values
    # and so the same digests, resumes to the uninterrupted factors: the codec is read from the
    # arrays' metadata.
    import zarr

    store, cfg, ref = work
    slot = zarr.open_group(str(ckpt(store) / "slot1"), mode="r")
    names = ["w", "d", "h_scale", *(f"h/{j}" for j in range(len(slot["h"])))]
    assert len(names) > 4 and all(slot[name].compressors == () for name in names)
    for name in names:
        data = slot[name][...]
        zarr.create_array(str(ckpt(store) / "slot1" / name), data=data, chunks=slot[name].chunks, fill_value=np.nan,
                          compressors=zarr.codecs.ZstdCodec(), overwrite=True, config={"write_empty_chunks": True})
    again = zarr.open_group(str(ckpt(store) / "slot1"), mode="r")
    assert all(len(again[name].compressors) == 1 for name in names)
    with caplog.at_level(logging.INFO, logger="dnmf"):
        res = run_job(cfg, resume=True, client=False, echo=quiet)
    # from slot1's iteration 4, without a warning (a fresh start would give the same factors)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from iteration 4 (") for m in messages), messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_reference(res.store, ref)


def test_broken_checkpoint_zarr_json_resumes_from_the_best_valid_slot(work, caplog):
    store, cfg, ref = work
    (ckpt(store) / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    res, warning = resume_with_warning(cfg, caplog)
    assert warning.startswith(f"checkpoint {ckpt(store)}: zarr.json: unreadable (JSONDecodeError: ")
    assert warning.endswith("resuming from slot1 (iteration 4) instead")
    assert_reference(res.store, ref)


def test_broken_array_zarr_json_falls_back(work, caplog):
    store, cfg, ref = work
    (ckpt(store) / "slot1" / "w" / "zarr.json").write_text("not json")
    res, warning = resume_with_warning(cfg, caplog)
    assert warning.startswith(f"checkpoint {ckpt(store)}: slot1: unreadable (")
    assert_reference(res.store, ref)


def test_broken_run_store_zarr_json_is_one_error(work):
    store, cfg, _ = work
    (store / "zarr.json").write_text("{")
    with pytest.raises(CheckpointError) as info:
        run_job(cfg, resume=True, client=False, echo=quiet)
    assert str(info.value).startswith(f"The run store at '{store}' is damaged: its zarr.json cannot be read "
                                      "(JSONDecodeError: ")
    assert str(info.value).endswith("It cannot be resumed; pass --overwrite to start over.")
    lines = []
    res = run_job(cfg, overwrite=True, client=False, echo=lines.append)
    assert lines[0] == f"replacing the damaged run store at {store}" and RunStore.open(res.store).is_complete


def test_slot_attribute_pointing_nowhere(work, caplog):
    store, cfg, ref = work
    edit_attrs(ckpt(store) / "zarr.json", slot="slot7")
    res, warning = resume_with_warning(cfg, caplog)
    assert warning == (f"checkpoint {ckpt(store)}: slot: the 'slot' attribute 'slot7' is not one of slot0, slot1; "
                       "resuming from slot1 (iteration 4) instead")
    assert_reference(res.store, ref)


def test_crafted_iteration_count_or_converged_flag_is_not_trusted(work, caplog):
    store, cfg, ref = work
    # iteration ≥ maxit and "converged" would have skipped the loop and marked the run complete
    edit_attrs(ckpt(store) / "slot1" / "zarr.json", iteration=MAXIT, converged=True)
    edit_attrs(ckpt(store) / "zarr.json", iteration=MAXIT)
    res, warning = resume_with_warning(cfg, caplog)
    assert warning == (f"checkpoint {ckpt(store)}: slot1: its attributes do not match their checksum (incomplete "
                       "save or edited); resuming from slot0 (iteration 2) instead")
    assert_reference(res.store, ref)


def test_crafted_iteration_count_in_both_slots_is_refused(work):
    store, cfg, _ = work
    for slot in ("slot0", "slot1"):
        edit_attrs(ckpt(store) / slot / "zarr.json", iteration=MAXIT)
    with pytest.raises(CheckpointError, match=r"\(slot1: its attributes do not match their checksum .*; slot0: its "
                                              r"attributes do not match their checksum .*\)\. Pass --overwrite"):
        run_job(cfg, resume=True, client=False, echo=quiet)
    assert not RunStore.open(store).is_complete


def test_missing_result_chunk_of_a_complete_run_is_detected(made, tmp_path):
    root, _, _ = made
    store = RunStore.open(root / "runs" / "ref.zarr")
    copy = RunStore.open(shutil.copytree(store.path, tmp_path / "ref.zarr"))
    (copy.path / "model" / "w" / "c" / "0" / "0").unlink()
    assert copy.verify() == ["model/w: 1 of 1 chunk(s) missing"]
    with pytest.raises(CheckpointError, match=r"1 of 1 chunk\(s\) of 'model/w' are missing"):
        copy.read_group("model")


def test_damaged_sweep_task_is_redone_or_refused_with_one_message(tmp_path, caplog):
    store = RunStore.create(tmp_path / "r.zarr", {"pipeline": "x", "name": "r"})
    for key in ("a", "b"):
        store.save_task(key, {"x": np.zeros(5), "names": np.array(["", ""]), "v": 1.0})  # all-fill chunks too
    assert store.task_done("a") and store.task_done("b")
    (tmp_path / "r.zarr" / "checkpoint" / "tasks" / "a" / "x" / "c" / "0").unlink()
    with caplog.at_level(logging.WARNING, logger="dnmf.jobs.store"):
        assert not store.task_done("a")  # run again on resume, never read back as zeros
    assert caplog.records[-1].getMessage() == (f"sweep task 'a' in {tmp_path / 'r.zarr'} is damaged (chunks missing "
                                               "in x); running it again")
    (tmp_path / "r.zarr" / "checkpoint" / "tasks" / "b" / "x" / "c" / "0").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"^The run store at '{tmp_path / 'r.zarr'}' is damaged: "
                                              r"'checkpoint/tasks/b/x' cannot be read \(.*\)\. Run it again "
                                              r"with --overwrite\.$"):
        store.load_task("b")


# ---------------------------------------------------------------------------------------------
# Extending a finished fit with a larger maxit
# ---------------------------------------------------------------------------------------------


def test_maxit_extension_on_resume_equals_one_longer_run(made, tmp_path, monkeypatch):
    root, ref, _ = made
    monkeypatch.chdir(tmp_path)
    data = config_data(root, "ext", maxit=5)
    data["output"]["dir"] = str(tmp_path / "runs")
    first = run_job(JobConfig.from_dict(data), client=False, echo=quiet)
    store = RunStore.open(first.store)
    assert store.is_complete and store.extendable_checkpoints() == {"nmf": 5}  # stopped by maxit: kept
    data["model"]["maxit"] = MAXIT
    data["checkpoint"]["every"] = 3  # spacing of checkpoints may change too
    lines = []
    res = run_job(JobConfig.from_dict(data), resume=True, client=False, echo=lines.append)
    assert lines[0] == (f"the run at {first.store} stopped at model.maxit=5 without converging; "
                        f"continuing it to model.maxit={MAXIT}")
    assert_reference(res.store, ref)
    store = RunStore.open(res.store)
    assert store.is_complete and store.meta["attempts"] == 2 and store.meta["config"]["model"]["maxit"] == MAXIT
    # the same maxit again: nothing to do; a smaller one cannot undo iterations
    lines.clear()
    assert run_job(JobConfig.from_dict(data), resume=True, client=False, echo=lines.append).skipped
    assert lines == [f"the run at {first.store} is already complete; nothing to resume"]
    data["model"]["maxit"] = 6
    with pytest.raises(dnmf.ConfigError, match=r"with model.maxit=6: its checkpoint 'nmf' is at iteration 8 already"):
        run_job(JobConfig.from_dict(data), resume=True, client=False, echo=quiet)


def test_maxit_cannot_change_under_finished_sweep_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {"pipeline": "nmfre", "name": "sweep", "input": {"dataset": "orthodont"},
            "model": {"rank": 1, "df_rate": 0.2}, "output": {"dir": str(tmp_path), "plots": False,
                                                             "performance_report": False}, "progress": "none"}
    cfg = JobConfig.from_dict(data)
    store = RunStore.create(cfg.store_path, {"pipeline": "nmfre", "name": "sweep", "config": cfg.to_dict()})
    store.save_task("scan-0.2", {"dfU": np.ones(1)})  # computed with the old maxit
    store.mark_stopped("interrupted")
    data["model"]["maxit"] = 100
    message = (f"Cannot resume the run at '{cfg.store_path}': its config differs (model.maxit: run has 50000, "
               "config has 100). Resume with the same config, or start over with --overwrite.")
    with pytest.raises(dnmf.ConfigError) as info:
        run_job(JobConfig.from_dict(data), resume=True, client=False, echo=quiet)
    assert str(info.value) == message
    store.mark_complete()  # complete without an engine-checkpointed fit: nothing a larger maxit extends
    with pytest.raises(dnmf.ConfigError) as info:
        run_job(JobConfig.from_dict(data), resume=True, client=False, echo=quiet)
    assert str(info.value) == message


def test_checkpoint_fingerprint_ignores_what_only_extends_a_fit():
    from dnmf.engine.checkpoint import fingerprint

    base = {"k": 4, "tol": 0.0, "maxit": 5, "checkpoint_every": 2}
    same = fingerprint((3, 4), [0, 4], base)
    assert fingerprint((3, 4), [0, 4], {**base, "maxit": 50, "checkpoint_every": 7}) == same
    assert fingerprint((3, 4), [0, 4], {**base, "tol": 1e-4}) != same


# ---------------------------------------------------------------------------------------------
# The performance report: self-contained, one per attempt
# ---------------------------------------------------------------------------------------------


def test_performance_report_is_self_contained_and_kept_per_attempt(made, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from dnmf.engine.executor import scheduler_workers

    root, _, _ = made
    monkeypatch.chdir(tmp_path)
    data = config_data(root, "rep", maxit=3)
    data["output"].update(dir=str(tmp_path / "runs"), performance_report=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cl, distributed.Client(cl) as client:
        assert len(scheduler_workers(client)) == 2
        first = run_job(JobConfig.from_dict(data), client=client, echo=quiet)
        report1 = tmp_path / "runs" / "rep-report.html"
        text1 = report1.read_text()
        data["model"]["maxit"] = 4
        second = run_job(JobConfig.from_dict(data), client=client, resume=True, echo=quiet)
    assert "<script src=\"http" not in text1 and "cdn.bokeh.org" not in text1  # opens without internet
    assert "Dask Performance Report" in text1 and "Bokeh" in text1
    # its calling code is the job's: the config and the pipeline's source (quotes come HTML-escaped)
    assert "# dnmf run: job " in text1 and "factorize" in text1 and "(pipelines.factorize)" in text1
    assert "#   name: rep" in text1 and "def run(config, job)" in text1
    report2 = tmp_path / "runs" / "rep-report-2.html"
    assert report1.read_text() == text1 and report2.is_file()  # the resumed attempt did not overwrite it
    store = RunStore.open(second.store)
    assert store.meta["reports"] == ["rep-report.html", "rep-report-2.html"]
    # the first attempt lists only its own report (beside its other outputs, e.g. the top-features table)
    assert {report1, report2} <= set(second.files)
    assert [f for f in first.files if f.name.endswith(".html")] == [report1]
