"""The one subprocess runner of the tests and the GPU check (tools/gpu_check): a command in its own process
group, with a time limit that stops the whole group (data-parallel ranks, dataloader workers, pytest's
children), its output captured or appended to a log file."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finished:
    """A finished command: its exit status (None: stopped at its time limit), the seconds it took, and its
    output (empty when it went to a log file)."""

    argv: tuple[str, ...]
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike,
    timeout: float,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    grace_s: float = 10.0,
) -> Finished:
    """Run `argv` in a new session (its own process group) in `cwd` with `env` (default: this process's).

    Output: captured into `Finished.stdout`/`stderr`, or with `log` appended to that file (stderr merged,
    after a `$ command` line). At `timeout` seconds the whole group gets SIGTERM, then SIGKILL after
    `grace_s`, and the result's returncode is None.
    """
    start = time.monotonic()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            proc = subprocess.Popen(
                list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            code = _wait(proc, timeout, grace_s)
            if code is None:
                out.write(f"\n[stopped at its time limit of {timeout:.0f} s]\n")
        return Finished(tuple(argv), code, time.monotonic() - start)
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1.0))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace_s)
        stdout, stderr = proc.communicate()
        code = None
    except BaseException:  # the caller's own limit (pytest-timeout), an interrupt: no process is left
        _stop_group(proc, grace_s)
        raise
    return Finished(tuple(argv), code, time.monotonic() - start, stdout, stderr)


def _wait(proc: subprocess.Popen, timeout: float, grace_s: float) -> int | None:
    try:
        return proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace_s)
        return None
    except BaseException:
        _stop_group(proc, grace_s)
        raise


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group, then SIGKILL if it is still there after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
