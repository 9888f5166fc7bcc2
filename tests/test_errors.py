"""The one error policy of every command, on real processes: a user error is one line and exit
1 (a usage error 2), a bug keeps its traceback, Ctrl-C ends with one line saying how to resume."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, as_typed_at_a_terminal, subprocess_env, validated_past
from PIL import Image

from pipeline.errors import DiskFullError, UsageError, UserError


def _run(args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_a_user_error_prints_one_line_and_exits_1(tmp_path):
    out = _run([REPO / "extract_features.py", "--data", tmp_path / "none.csv", "--backbone",
                "tiny", "--device", "cpu", "--cache-dir", tmp_path / "cache"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"error: --data {tmp_path / 'none.csv'}: manifest not found; --data takes a manifest CSV "
        "(`sam3-vessel data import` writes one) or `demo`"]


def test_each_cli_applies_the_same_policy(tmp_path):
    for args, code in [(["-m", "pipeline.data", "check", "none.csv"], 1),
                       (["-m", "pipeline.cache", "--cache-dir", tmp_path, "info", "nope"], 2),
                       (["-m", "pipeline.runs", "compare", tmp_path / "no-run"], 1),
                       (["-m", "pipeline.predict", "--run", tmp_path / "no-run", "--data",
                         "none.csv", "--out", tmp_path / "p", "--device", "cpu"], 1)]:
        out = _run(args, tmp_path)
        assert out.returncode == code, (args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)


def test_a_manifest_with_errors_is_one_error_listing_each_problem_once(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "bad.csv").write_text("image,mask,view,split\nmissing.png,m.png,LAO,train\n"
                                      "a.png,m.png,LAO,val\n")
    for script in ("extract_features.py", "train_head.py"):
        out = _run([REPO / script, "--data", "bad.csv", "--backbone", "tiny", "--device", "cpu"],
                   tmp_path)
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith("error: manifest check: 2 rows, 2 errors"), out.stderr
        both = out.stdout + out.stderr
        assert both.count("manifest check:") == 1, both
        assert both.count(f"row 1: {tmp_path / 'missing.png'}: file not found") == 1
        assert both.count("mask is 16x16 (HxW) but its image a.png is 32x32 (HxW)") == 1
        assert not (tmp_path / "cache").exists()  # nothing made before the check


def test_a_bug_keeps_its_traceback(tmp_path):
    # A real bug inside a command run under the policy: not a UserError, so not hidden.
    code = ("import sys\nfrom pipeline.errors import run_command\n"
            "def main():\n    return {}['missing']\n"
            "sys.exit(run_command(main, resume='again'))\n")
    out = _run(["-c", code], tmp_path)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.rstrip().endswith("KeyError: 'missing'")
    assert "error: " not in out.stderr


def test_a_warning_of_the_package_is_one_line_and_others_keep_their_origin(tmp_path):
    code = ("import sys, warnings\nfrom pipeline.errors import run_command\n"
            "from pipeline.data.samples import ViewVocabulary\n"
            "from pipeline.data.manifest import Sample\n"
            "def main():\n"
            "    ViewVocabulary(('LAO', 'RAO')).warn_unseen([Sample(1, 'a.png', None, "
            "'RA0', None)], 'new.csv')\n"
            "    warnings.warn('not ours')\n    return 0\n"
            "sys.exit(run_command(main, resume='again'))\n")
    out = _run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == ("warning: new.csv: views ['RA0'] were not seen in training (it learnt "
                        "['LAO', 'RAO']); they use the unknown-view embedding ('RA0': did you "
                        "mean 'RAO'?)")
    assert lines[1].endswith("UserWarning: not ours")


def test_ctrl_c_ends_training_with_the_resume_line(dataset, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(dataset), "--backbone",
         "tiny", "--cache-dir", str(tmp_path / "cache"), "--extract-missing", "--run-dir",
         str(run), "--steps", "100000", "--val-every", "2", "--batch-size", "2",
         "--loader-workers", "0", "--device", "cpu"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=as_typed_at_a_terminal)
    deadline = time.time() + 180
    while time.time() < deadline and not validated_past(run, 2) and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)  # Ctrl-C, to the command's own process
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: continue with `sam3-vessel train --resume {run}` (from "
                     "its last checkpoint, last.pt; a run stopped before its first one starts "
                     "again)"]


def test_sigterm_to_the_job_ends_training_like_ctrl_c_with_a_report(dataset, tmp_path):
    """What Slurm does at the time limit: SIGTERM to every process of the job (the loader
    worker included), then SIGKILL after a grace period."""
    import json

    from pipeline.runs import load_run
    from pipeline.train.checkpoint import saved_step

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(dataset), "--backbone",
         "tiny", "--cache-dir", str(tmp_path / "cache"), "--extract-missing", "--run-dir",
         str(run), "--steps", "100000", "--val-every", "2", "--batch-size", "2",
         "--loader-workers", "1", "--memory-cache-mb", "0", "--device", "cpu"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (validated_past(run, 2) and (run / "last.pt").exists()
                                          ) and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)  # within Slurm's default KillWait (30 s)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted by SIGTERM: continue with `sam3-vessel train --resume "
                     f"{run}` (from its last checkpoint, last.pt; a run stopped before its first "
                     "one starts again)"]
    report = json.loads((run / "report.json").read_text())
    step = saved_step(run / "last.pt")  # whole: a checkpoint being written is finished first
    assert step >= 2 and report["interrupted"] == {
        "by": "SIGTERM", "step": step, "of": 100000,
        "resume": f"sam3-vessel train --resume {run}"}
    assert report["val"]["n"] > 0 and (run / "curves.png").is_file()
    assert not load_run(run).finished


def test_a_signal_inside_deferred_interrupts_waits_for_the_block():
    from pipeline.errors import Terminated, deferred_interrupts

    finished = []
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and only noted the signal
            finished.append(True)
    except Terminated:
        pass
    else:
        raise AssertionError("SIGTERM was not raised after the block")
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_an_ignored_signal_stays_ignored_inside_deferred_interrupts():
    """A background job of a shell script starts with SIGINT ignored; a checkpoint's deferred
    block must not turn a Ctrl-C it was never meant to get into a stop."""
    from pipeline.errors import deferred_interrupts, terminate_like_interrupt

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert terminate_like_interrupt() is None  # SIGTERM stays ignored too
        with deferred_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_worker_obeys_sigterm_even_where_it_was_started_ignoring_it():
    """Spawned training workers are stopped by their parent with SIGTERM: `force` takes it
    back from SIG_IGN, and it then raises `Terminated`."""
    from pipeline.errors import Terminated, terminate_like_interrupt

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert terminate_like_interrupt(force=True) is signal.SIG_IGN
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_every_user_error_is_a_user_error_and_keeps_its_builtin_base():
    from pipeline.cache.store import CacheError, UnknownCacheError
    from pipeline.data.images import ImageError
    from pipeline.data.manifest import ManifestError
    from pipeline.distributed import WorkerError
    from pipeline.extraction import NonFiniteFeaturesError
    from pipeline.model.lora import AdapterError
    from pipeline.train.run_files import RunDirError

    for cls, base in [(ManifestError, ValueError), (ImageError, ValueError),
                      (CacheError, RuntimeError), (RunDirError, RuntimeError),
                      (WorkerError, RuntimeError), (NonFiniteFeaturesError, RuntimeError),
                      (AdapterError, FileNotFoundError), (DiskFullError, OSError)]:
        assert issubclass(cls, UserError) and issubclass(cls, base), cls
    assert issubclass(UnknownCacheError, UsageError)
    assert str(DiskFullError("No space left on device while writing x")) == (
        "No space left on device while writing x")
