"""What the tests share besides their fixtures (tests/conftest.py): the one subprocess runner
(`processes`) and the fault-injection callback of the failure tests (`faults`). tests/ is on the path of the
test processes, of the training subprocesses they start, and of the GPU check (tools/gpu_check), which runs
its commands with the same runner."""
