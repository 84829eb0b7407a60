"""One step of a GPU check: a command run with a time limit, its output in a log file, and its record."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# step statuses: ok; failed (non-zero exit, or a check failed); timeout (killed at its limit); skipped (not
# applicable, e.g. no CUDA tests); not_run (an earlier step failed, or no time was left)
OK, FAILED, TIMEOUT, SKIPPED, NOT_RUN = "ok", "failed", "timeout", "skipped", "not_run"


@dataclass
class StepRecord:
    """What a step did: status, seconds taken, its limit, the commands it ran, its log and outputs."""

    name: str
    title: str
    status: str = NOT_RUN
    seconds: float = 0.0
    limit_s: float = 0.0
    commands: list[str] = field(default_factory=list)
    log: str | None = None
    outputs: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Finished:
    """A finished command: exit status (None when killed at its limit) and seconds taken."""

    returncode: int | None
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(
    argv: Sequence[str], log: Path, limit_s: float, env: dict[str, str], cwd: Path, grace_s: float = 10.0
) -> Finished:
    """Run `argv` with stdout and stderr appended to `log`; at `limit_s` its whole process group is stopped
    (SIGTERM, then SIGKILL after `grace_s`), so dataloader workers and other children go with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            code = None
            _stop_group(proc, grace_s)
            out.write(f"\n[gpu_check] stopped at its time limit of {limit_s:.0f} s\n")
    return Finished(code, time.monotonic() - start)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
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


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
