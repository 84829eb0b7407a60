"""One step of a GPU check: its status, time, commands, log and outputs (the commands themselves run with the
tests' runner, `support.processes.run_command`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# step statuses: ok; failed (non-zero exit, or a check failed); timeout (killed at its limit); skipped (not
# applicable, e.g. no tests folder); not_run (an earlier step failed, or no time was left)
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


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
