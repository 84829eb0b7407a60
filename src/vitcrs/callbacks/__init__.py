"""Lightning callbacks: memory/speed measurement, gradient fidelity, the run's metrics.json, checkpoints that
follow a moved run dir and one on SIGTERM, and fault injection for tests."""

from .checkpoint import RunDirCheckpoint
from .grad_fidelity import GradFidelityMonitor
from .interrupt import CheckpointOnSigterm
from .memory import PeakMemoryMonitor
from .metrics_file import MetricsFile, describe_run, record_refusal

__all__ = [
    "CheckpointOnSigterm",
    "GradFidelityMonitor",
    "MetricsFile",
    "PeakMemoryMonitor",
    "RunDirCheckpoint",
    "describe_run",
    "record_refusal",
]
