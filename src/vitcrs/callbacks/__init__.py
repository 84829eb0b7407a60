"""Lightning callbacks: memory/speed measurement and the run's metrics.json."""

from .memory import PeakMemoryMonitor
from .metrics_file import METRICS_KEYS, MetricsFile, write_json_atomic

__all__ = ["METRICS_KEYS", "MetricsFile", "PeakMemoryMonitor", "write_json_atomic"]
