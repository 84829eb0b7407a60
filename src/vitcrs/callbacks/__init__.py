"""Lightning callbacks: memory/speed, gradient fidelity, the run's metrics.json, fault injection for tests."""

from .faults import FaultInjector
from .grad_fidelity import GradFidelityMonitor
from .memory import PeakMemoryMonitor
from .metrics_file import METRICS_KEYS, MetricsFile, write_json_atomic

__all__ = [
    "METRICS_KEYS",
    "FaultInjector",
    "GradFidelityMonitor",
    "MetricsFile",
    "PeakMemoryMonitor",
    "write_json_atomic",
]
