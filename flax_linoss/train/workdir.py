"""A run's folder: checked before a run writes there, locked against a second run, and the
time of every session that trained there.

* :class:`RunFolder` is what :class:`~flax_linoss.train.trainer.Run` opens first: it refuses
  a ``--workdir`` that is a file or cannot be written (:class:`WorkdirError`, one line), then
  takes the folder's lock (``WORKDIR/.lock``, an ``fcntl`` lock that the kernel releases
  when its process dies, so a killed run never blocks the rerun that resumes it). A second
  run in the same folder is refused with :class:`WorkdirBusyError`, naming the process that
  holds it (pid, host, start time, command). Where the file system has no ``fcntl`` locks,
  the pid in the lock file decides: alive on this host, the folder is busy; dead, the lock
  is stale and taken over.
* ``WORKDIR/sessions.json`` records each session that trained there (pid, host, start,
  first and last step, seconds in the training loop), rewritten at every progress line, so
  the time of a session that was killed before its next checkpoint is kept:
  ``results.json``'s ``train_seconds`` (and ``flax-linoss reproduce``'s wall time) is the
  sum over sessions.
* :class:`Interrupted` is the ``KeyboardInterrupt`` a run raises when Ctrl-C stops it: it
  knows the step reached and the step a rerun resumes from. :func:`stop_requests` defers
  Ctrl-C to the training loop's next step (an interrupt raised inside Orbax's or JAX's
  machinery can be lost there, or leave a save half-registered); a second Ctrl-C
  interrupts at once.
* :func:`describe_failure` turns the operating-system failures a user can fix (a full disk,
  a read-only or forbidden folder) into one line, wherever in an exception chain they are
  (Orbax wraps them in its own errors).

Only process 0 of a multi-process run takes the lock and writes the sessions file (all
processes of one run share the folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

__all__ = [
    "LOCK_FILE",
    "SESSIONS_FILE",
    "Interrupted",
    "RunFolder",
    "WorkdirBusyError",
    "WorkdirError",
    "check_workdir",
    "describe_failure",
    "exception_chain",
    "latest_checkpoint_step",
    "stop_requests",
    "total_train_seconds",
]

LOCK_FILE = ".lock"
SESSIONS_FILE = "sessions.json"


class WorkdirError(RuntimeError):
    """The workdir cannot hold a run (a file, not writable); the message is one line."""


class WorkdirBusyError(WorkdirError):
    """Another run holds the workdir's lock; the message names its process."""


@contextlib.contextmanager
def stop_requests():
    """Within this block a first Ctrl-C (SIGINT) only records a request: yields a function
    that says whether one came, for the loop to stop at a step boundary. A second Ctrl-C
    raises ``KeyboardInterrupt`` at once. The previous handler is restored on exit. Off the
    main thread (where Python cannot take signals) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = []

    def handler(signum, frame):
        if requested:
            signal.default_int_handler(signum, frame)
        requested.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at ``step``; a rerun of the same command resumes from
    ``resume_step`` (its last complete checkpoint; 0 if there is none)."""

    def __init__(self, step: int, resume_step: int):
        super().__init__(
            f"interrupted at step {step}; rerun the same command to resume from step {resume_step}"
        )
        self.step, self.resume_step = step, resume_step


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` if needed and checks that a run can write there.

    Raises:
        WorkdirError: It is a file, or it (or a parent) cannot be created or written (a
            read-only file system, no permission).
    """
    if not workdir:
        raise WorkdirError("the workdir is empty: give --workdir=DIR")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"cannot write to --workdir={workdir} ({e.strerror or e}): a run writes its "
            "checkpoints and metrics there; use a writable folder (`flax-linoss eval` reads a "
            "read-only run)"
        ) from None


# ----------------------------------------------------------------------------------------
# The lock.

_HELD: dict[str, Any] = {}  # real path -> [open lock file, count] held by this process


def _host() -> str:
    return socket.gethostname()


def _holder(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(workdir: str, holder: dict[str, Any]) -> WorkdirBusyError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f", since {holder['started']}" if holder.get("started") else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    return WorkdirBusyError(
        f"--workdir={workdir} is in use by another run ({who}{since}{command}); wait for it "
        "to end, or use another --workdir"
    )


def _acquire(workdir: str) -> None:
    key = os.path.realpath(workdir)
    if key in _HELD:  # this process holds it already (a run inside a run, a notebook)
        _HELD[key][1] += 1
        return
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")  # held open while the run lasts
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.close()
        raise _busy(workdir, _holder(path)) from None
    except (ImportError, OSError):  # no fcntl locks here: the recorded pid decides
        holder = _holder(path)
        pid = holder.get("pid")
        if holder.get("host") == _host() and pid != os.getpid() and _alive(int(pid or 0)):
            f.close()
            raise _busy(workdir, holder) from None
    f.seek(0)
    f.truncate()
    json.dump(
        {
            "pid": os.getpid(),
            "host": _host(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        },
        f,
    )
    f.flush()
    _HELD[key] = [f, 1]


def _release(workdir: str) -> None:
    key = os.path.realpath(workdir)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        held[0].close()  # closing the file releases its fcntl lock


# ----------------------------------------------------------------------------------------
# Sessions.


def _read_sessions(workdir: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(workdir, SESSIONS_FILE)) as f:
            sessions = json.load(f)
        return sessions if isinstance(sessions, list) else []
    except (OSError, ValueError):
        return []


def total_train_seconds(workdir: str) -> float | None:
    """Seconds in the training loop over every session in ``workdir`` (``None``: none)."""
    sessions = _read_sessions(workdir)
    if not sessions:
        return None
    return float(sum(s.get("train_seconds", 0.0) for s in sessions))


class RunFolder:
    """A run's hold on its workdir (see the module docstring).

    Args:
        workdir: The run folder (created if needed).
        primary: This process takes the lock and writes the sessions file (process 0).

    Raises:
        WorkdirError: The folder cannot hold a run.
        WorkdirBusyError: Another run holds it.
    """

    def __init__(self, workdir: str, *, primary: bool = True):
        self.workdir, self.primary = workdir, primary
        self._session: dict[str, Any] | None = None
        self._held = False
        if primary:
            check_workdir(workdir)
            _acquire(workdir)
            self._held = True

    def record(self, first_step: int, step: int, seconds: float) -> None:
        """Records this session's training so far: from ``first_step`` to ``step`` in
        ``seconds`` of training loop (the first call adds the session)."""
        if not self.primary:
            return
        sessions = _read_sessions(self.workdir)
        if self._session is None:
            self._session = {
                "pid": os.getpid(),
                "host": _host(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            sessions.append(self._session)
            self._index = len(sessions) - 1
        self._session.update(first_step=first_step, last_step=step, train_seconds=seconds)
        if self._index < len(sessions):
            sessions[self._index] = self._session
        else:  # the file was removed meanwhile
            sessions.append(self._session)
            self._index = len(sessions) - 1
        path = os.path.join(self.workdir, SESSIONS_FILE)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(sessions, f, indent=1)
        os.replace(tmp, path)

    def total_seconds(self) -> float | None:
        """Seconds in the training loop over every session (``None``: none trained)."""
        return total_train_seconds(self.workdir)

    def release(self) -> None:
        """Releases the lock (once; later calls do nothing)."""
        if self._held:
            self._held = False
            _release(self.workdir)


# ----------------------------------------------------------------------------------------
# Failures the user can fix.

_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|os_error_code='28'")
_QUOTA = re.compile(r"Disk quota exceeded|\[Errno 122\]|os_error_code='122'")
_READ_ONLY = re.compile(r"Read-only file system|\[Errno 30\]|os_error_code='30'")
_DENIED = re.compile(r"Permission denied|\[Errno 13\]|os_error_code='13'")


def exception_chain(e: BaseException):
    """``e``, then its ``__cause__`` (or ``__context__``), and so on."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def latest_checkpoint_step(workdir: str | None) -> int | None:
    """The newest complete checkpoint's step in ``WORKDIR/checkpoints`` (by folder name;
    Orbax names unfinished saves ``<step>.orbax-checkpoint-tmp...``)."""
    try:
        names = os.listdir(os.path.join(workdir or "", "checkpoints"))
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps) if steps else None


_FAILURES = (  # (errno, pattern, what, what to do)
    (errno.ENOSPC, _NO_SPACE, "no space left on the device", "free some space"),
    (errno.EDQUOT, _QUOTA, "the disk quota is exceeded", "free some space"),
    (errno.EROFS, _READ_ONLY, "the file system is read-only", "use a writable --workdir"),
    (errno.EACCES, _DENIED, "permission denied", "use a --workdir you may write to"),
    (errno.EPERM, _DENIED, "permission denied", "use a --workdir you may write to"),
)


def describe_failure(e: BaseException, workdir: str | None) -> str | None:
    """One line for a failure the user can fix (no space, quota, read-only, no permission)
    anywhere in ``e``'s chain, naming the workdir and the step a rerun resumes from; else
    ``None``."""
    for x in exception_chain(e):
        code, text = getattr(x, "errno", None), str(x)
        for number, pattern, what, fix in _FAILURES:
            if code == number or pattern.search(text):
                where = f" writing to {workdir}" if workdir else ""
                resume = latest_checkpoint_step(workdir)
                then = (
                    f"rerun the same command to resume from step {resume}"
                    if resume is not None
                    else "rerun the same command"
                )
                return f"{what}{where} (errno {number}): {fix}, then {then}"
    return None


def drop_closed_loop_callbacks(default):
    """``sys.unraisablehook`` that drops the "Event loop is closed" a read that failed
    leaves behind (tensorstore's callbacks into Orbax's finished event loop, which fire at
    any time up to the interpreter's exit) and passes anything else to ``default``."""

    def unraisable(u) -> None:
        if not (
            isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        ):
            default(u)

    return unraisable


@contextlib.contextmanager
def quiet_background_errors():
    """While a command runs: drop the ERROR lines (and tracebacks) Orbax logs for a failure
    it raises again in the main thread (a full disk is logged a dozen times, Ctrl-C while
    waiting for a save once), and the "Event loop is closed" that tensorstore's callbacks
    print after a failed read (:func:`drop_closed_loop_callbacks`); the command then
    reports the failure once."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (
                record.levelno >= logging.ERROR
                and "orbax" in record.pathname
                and (record.exc_info or "raised an exception" in record.getMessage())
            )

    logger, flt, default = logging.getLogger("absl"), _Filter(), sys.unraisablehook
    logger.addFilter(flt)
    sys.unraisablehook = drop_closed_loop_callbacks(default)
    try:
        yield
    finally:
        logger.removeFilter(flt)
        sys.unraisablehook = default
