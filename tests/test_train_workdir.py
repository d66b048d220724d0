"""A run's folder under adversity (issue 22): a second run refused while a killed one's lock
is not, damaged checkpoints skipped, a full disk / read-only folder / file / Ctrl-C as one
line, and the training time of every session summed."""

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from conftest import kill_after, xla_flags
from conftest import tiny_config as _tiny

from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import trainer
from flax_linoss.train import workdir as workdir_lib

TINY = "from flax_linoss.train.default_config import get_tiny_config as get_config\n"


def _env(**extra):
    flags = xla_flags()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONUNBUFFERED="1", **extra)


def _cli(*args, cwd=None, timeout=240, python=None):
    """``flax-linoss ARGS`` in a subprocess; ``python`` runs first (a patch)."""
    code = f"{python or ''}\nfrom flax_linoss.cli import main\nmain(['flax-linoss', *{args!r}])"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _one_line(out, status=1):
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == status, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(err) == 1, out.stderr[-3000:]
    return err[0]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 12 and 24), to copy."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    trainer.train_and_evaluate(_tiny(), str(workdir))
    return workdir


def _copy(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "run")


# ----------------------------------------------------------------------------------------
# 7. One run per workdir.


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_first_and_a_killed_runs_lock_is_stale(
    tmp_path, tiny_file
):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from flax_linoss.train.workdir import RunFolder\n"
            f"RunFolder({str(workdir)!r})\n"
            "print('holding', flush=True)\n"
            "time.sleep(600)\n",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        out = _cli("train", f"--config={tiny_file}", f"--workdir={workdir}")
        line = _one_line(out)
        assert f"--workdir={workdir} is in use by another run (pid {holder.pid} on " in line
        assert socket.gethostname() in line
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The lock file still names the killed process; its lock died with it.
    assert json.loads((workdir / workdir_lib.LOCK_FILE).read_text())["pid"] == holder.pid
    out = _cli("train", f"--config={tiny_file}", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((workdir / "results.json").read_text())["final_step"] == 24


def test_without_fcntl_locks_the_recorded_pid_decides(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / workdir_lib.LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {sleeper.pid} on"):
            workdir_lib.RunFolder(str(workdir))
    finally:
        sleeper.kill()
        sleeper.wait()
    folder = workdir_lib.RunFolder(str(workdir))  # the pid is dead: a stale lock
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    folder.release()


# ----------------------------------------------------------------------------------------
# 8. Damaged checkpoints.


def _flip_a_bit(step_dir):
    """One bit of the largest array data file of a checkpoint's state."""
    path = max(glob.glob(f"{step_dir}/state/d/*"), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(step_dir):
    path = max(glob.glob(f"{step_dir}/state/d/*"), key=os.path.getsize)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_resume_skips_a_damaged_latest_checkpoint_with_one_warning(finished, tmp_path, capfd):
    workdir = _copy(finished, tmp_path)
    _flip_a_bit(workdir / "checkpoints" / "24")
    capfd.readouterr()
    res = trainer.train_and_evaluate(_tiny(**{"train.num_steps": 36}), str(workdir))
    out, err = capfd.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert f"the checkpoint at step 24 in {workdir / 'checkpoints'} is damaged" in warnings[0]
    assert "DATA_LOSS" in warnings[0] and "using the one at step 12" in warnings[0]
    assert f"Resumed from {workdir} at step 12." in out
    assert res["final_step"] == 36
    assert (workdir / "damaged" / "checkpoint_24" / "state").is_dir()  # kept, moved aside
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [24, 36]


def test_another_param_dtype_is_refused_and_older_signatures_read_as_float32(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    config = _tiny(**{"train.num_steps": 36, "model.param_dtype": "float64"})
    with jax.enable_x64(True), pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
        trainer.train_and_evaluate(config, str(workdir))
    assert "param_dtype: checkpoint 'float32' vs config 'float64'" in str(e.value)
    # A checkpoint written before the field existed has none in its signature: float32.
    older = {"state_size": 8}
    ckpt_lib.check_signature(older, {**older, "param_dtype": "float32"}, "w")
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="checkpoint 'float32' vs"):
        ckpt_lib.check_signature(older, {**older, "param_dtype": "float64"}, "w")


def test_eval_of_a_damaged_latest_checkpoint_uses_the_newest_intact_one(
    finished, tmp_path, capfd, tiny_file
):
    workdir = _copy(finished, tmp_path)
    _truncate(workdir / "checkpoints" / "24")
    capfd.readouterr()
    res = trainer.evaluate(_tiny(), str(workdir), which="latest")
    err = capfd.readouterr().err
    assert res["step"] == 12
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "at step 24" in warnings[0] and "damaged" in warnings[0]
    # Nothing intact: one line from the command line.
    _flip_a_bit(workdir / "checkpoints" / "12")
    out = _cli("eval", f"--workdir={workdir}", "--which=latest")
    assert "every checkpoint is damaged" in _one_line(out)


# ----------------------------------------------------------------------------------------
# 9. Failures a user can fix are one line.

NO_SPACE = """
import errno
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
    if step == 24 and str(self.directory).endswith("checkpoints"):
        {raise_}
    return _save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
"""


def test_a_full_disk_is_one_line_naming_the_step_to_resume_from(tmp_path, tiny_file):
    workdir = tmp_path / "run"
    raise_ = "raise OSError(errno.ENOSPC, 'No space left on device')"
    out = _cli(
        "train",
        f"--config={tiny_file}",
        f"--workdir={workdir}",
        python=NO_SPACE.replace("{raise_}", raise_),
    )
    line = _one_line(out)
    assert line == (
        f"flax-linoss: error: no space left on the device writing to {workdir} (errno 28): "
        "free some space, then rerun the same command to resume from step 12"
    )


def test_failures_are_recognised_through_orbaxs_wrappers(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    (tmp_path / "checkpoints" / "16.orbax-checkpoint-tmp-3").mkdir()  # unfinished
    # What a full disk raises through Orbax's tensorstore writes (seen on a 200 KiB tmpfs).
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.0.mu/0.0.0" in OCDBT database: Failed to '
        "write 95269 bytes to file 17: No space left on device [os_error_code='28']"
    )
    try:
        try:
            raise tensorstore
        except ValueError as e:
            raise RuntimeError("a save failed") from e
    except RuntimeError as e:
        wrapped = e
    assert workdir_lib.describe_failure(wrapped, str(tmp_path)) == (
        f"no space left on the device writing to {tmp_path} (errno 28): free some space, then "
        "rerun the same command to resume from step 8"
    )
    read_only = OSError(errno.EROFS, "Read-only file system")
    assert workdir_lib.describe_failure(read_only, None).startswith(
        "the file system is read-only (errno 30)"
    )
    assert workdir_lib.describe_failure(ValueError("shapes differ"), str(tmp_path)) is None


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` read-only: a read-only bind mount where this process may mount (root),
    else permissions (which root ignores: then the test is skipped)."""
    mounted = (
        subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    )
    if mounted:
        ro = ["mount", "-o", "remount,ro,bind", folder, folder]
        if subprocess.run(ro, capture_output=True).returncode != 0:
            subprocess.run(["umount", folder])
            mounted = False
    if not mounted:
        modes = {
            p: os.stat(p).st_mode for p in [folder, *glob.glob(f"{folder}/**", recursive=True)]
        }
        for p in modes:
            os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
        if os.access(folder, os.W_OK):
            for p, mode in modes.items():
                os.chmod(p, mode)
            pytest.skip("cannot make a folder read-only here (root without mount)")
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", folder])
        else:
            for p, mode in modes.items():
                os.chmod(p, mode)


def test_a_read_only_workdir_is_one_line(finished, tmp_path, tiny_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    workdir = _copy(finished, tmp_path)
    with _read_only(str(empty)), _read_only(str(workdir)):
        for folder, over in ((empty, ()), (workdir, ("--config.train.num_steps=36",))):
            out = _cli("train", f"--config={tiny_file}", f"--workdir={folder}", *over)
            line = _one_line(out)
            assert line.startswith(f"flax-linoss: error: cannot write to --workdir={folder} ")
            assert "Read-only file system" in line or "Permission denied" in line
        # Evaluating a read-only run works.
        out = _cli("eval", f"--workdir={workdir}", "--which=latest")
        assert out.returncode == 0 and "Checkpoint step 24" in out.stdout, out.stderr[-2000:]


def test_a_file_as_workdir_and_an_empty_workdir(tmp_path, tiny_file):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    line = _one_line(_cli("train", f"--config={tiny_file}", f"--workdir={afile}"))
    assert line == f"flax-linoss: error: --workdir={afile} is a file, not a folder"
    out = _cli("train", f"--config={tiny_file}", "--workdir=", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = os.listdir(tmp_path / "runs")
    assert out.stdout.startswith(f"--workdir is empty: this run goes to {tmp_path / 'runs'}/")
    assert len(runs) == 1 and runs[0] in out.stdout.splitlines()[0]


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_where_a_rerun_resumes(tmp_path, tiny_file):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flax_linoss",
            "train",
            f"--config={tiny_file}",
            f"--workdir={workdir}",
            "--config.train.num_steps=100000",
            "--config.train.checkpoint_every=20",
            "--config.train.log_every=20",
            "--config.train.eval_every=0",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step") and any("saving step 40" in s for s in seen):
                break
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(seen)[-2000:] + err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    resume = workdir_lib.latest_checkpoint_step(str(workdir))
    assert resume >= 40
    prefix, _, step = lines[0].partition("flax-linoss: interrupted at step ")
    step, _, rest = step.partition(";")
    assert not prefix and int(step) >= resume
    assert rest == f" rerun the same command to resume from step {resume}"


@pytest.fixture
def interactive_sigint():
    """SIGINT handled as in an interactive Python (a process started in the background by a
    shell, or after another test, may find it ignored); the original handler afterwards."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def test_ctrl_c_is_taken_between_steps_even_where_a_library_would_swallow_it(
    tmp_path, tamper_train_stream, interactive_sigint
):
    """A Ctrl-C that lands inside code catching ``KeyboardInterrupt`` (as Orbax's and JAX's
    machinery can) still stops the run, at the next step; a second one is immediate."""
    from flax_linoss.train import trainer

    def interrupted_inside_a_library(n, batch):
        if n == 5:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the signal arrives here
            except KeyboardInterrupt:
                pass  # swallowed
        return batch

    tamper_train_stream(interrupted_inside_a_library)
    config = _tiny(**{"train.num_steps": 40, "train.checkpoint_every": 4})
    with pytest.raises(workdir_lib.Interrupted) as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert info.value.step == 5 and info.value.resume_step == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    with workdir_lib.stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


# ----------------------------------------------------------------------------------------
# 10. The training time of every session.


def test_train_seconds_sum_every_session_also_one_killed_before_a_checkpoint(
    tmp_path, tamper_train_stream
):
    from flax_linoss.train.reproduce import reproduce, seed_dir

    config = _tiny(**{"train.log_every": 4, "train.checkpoint_every": 12})

    def slow_then_killed(n, batch):
        time.sleep(0.4)
        return kill_after(9)(n, batch)

    tamper_train_stream(slow_then_killed)  # 9 steps, 3.6 s, then a kill before step 12
    with pytest.raises(KeyboardInterrupt):
        reproduce(config, str(tmp_path), seeds=[7])
    tamper_train_stream.undo()
    res = reproduce(config, str(tmp_path), seeds=[7])
    sessions = json.loads((tmp_path / "seed_7" / workdir_lib.SESSIONS_FILE).read_text())
    assert [(s["first_step"], s["last_step"]) for s in sessions] == [(0, 9), (0, 24)]
    assert sessions[0]["train_seconds"] > 3.2  # the killed session's time is kept
    total = sum(s["train_seconds"] for s in sessions)
    assert res["seeds"][0]["train_seconds"] == pytest.approx(total)
    results = json.loads(open(os.path.join(seed_dir(str(tmp_path), 7), "results.json")).read())
    assert results["train_seconds"] == pytest.approx(total)
    assert ckpt_lib.checkpoint_meta(seed_dir(str(tmp_path), 7))[1] == 24


def test_a_save_still_in_flight_is_awaited_before_naming_the_resume_step(tmp_path):
    """Ctrl-C inside Orbax's save call leaves the save finishing in the background, where
    the manager's own wait does not see it: the resume step named is the one a rerun finds
    (the step whose temporary folder becomes a checkpoint after the call)."""
    import shutil
    import threading

    import orbax.checkpoint as ocp

    from flax_linoss.train import checkpoint

    meta = lambda step: ocp.args.Composite(meta=ocp.args.JsonSave({"step": step}))
    run = checkpoint.RunCheckpoints(str(tmp_path / "run"), keep=3, async_save=False)
    run.latest.save(40, args=meta(40))
    other = checkpoint.RunCheckpoints(str(tmp_path / "other"), keep=3, async_save=False)
    other.latest.save(60, args=meta(60))
    other.close()
    folder = tmp_path / "run" / "checkpoints"
    tmp = folder / "60.orbax-checkpoint-tmp-1"
    shutil.move(str(tmp_path / "other" / "checkpoints" / "60"), tmp)
    finish = threading.Timer(0.5, lambda: tmp.rename(folder / "60"))
    finish.start()
    try:
        assert run.committed_step() == 60
    finally:
        finish.join()
        run.close()


def test_callbacks_of_a_failed_read_are_dropped_and_other_unraisable_errors_kept(monkeypatch):
    """After a damaged checkpoint's read, tensorstore's callbacks into Orbax's closed event
    loop print "Event loop is closed" at any time up to the interpreter's exit (once in CI,
    after the one error line); the CLI's hook drops exactly those."""
    import types

    seen = []
    hook = workdir_lib.drop_closed_loop_callbacks(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(closed)
    hook(other)
    assert seen == [other]
    seen.clear()
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with workdir_lib.quiet_background_errors():
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
    assert seen == [other] and sys.unraisablehook == seen.append  # restored
