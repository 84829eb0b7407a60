"""Lightning callbacks: memory/speed measurement, the run's metrics.json, and fault injection for tests."""

from .faults import FaultInjector
from .memory import PeakMemoryMonitor
from .metrics_file import METRICS_KEYS, MetricsFile, write_json_atomic

__all__ = ["METRICS_KEYS", "FaultInjector", "MetricsFile", "PeakMemoryMonitor", "write_json_atomic"]
