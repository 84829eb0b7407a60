"""Byte units: the one definition of a MiB and a GiB (binary, as torch.cuda and the reports count)."""

MIB = 1 << 20
GIB = 1 << 30
