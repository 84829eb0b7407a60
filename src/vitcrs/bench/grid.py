"""The configurations a benchmark runs: presets (`quick`, `full`), subsets, and invalid combinations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from vitcrs.crs import MATMUL_TARGETS, METHODS, TARGET_SETS, CRSConfig

# the target sets (names in vitcrs.crs.TARGET_SETS) the presets run; --targets takes any set of the catalogue
BENCH_TARGET_SETS = ("study", "linears", "all", "lean", "lean_all", "lean_block")
ATTNS = ("eager", "sdpa")
PRECISIONS = ("fp32", "bf16-mixed")
RATIOS = (0.5, 0.3, 0.1)


class MemoryMode(NamedTuple):
    """How a step keeps what it needs: crs.keep_mid, optim.in_backward and crs.keep_dtype."""

    keep_mid: bool
    in_backward: bool
    keep_dtype: str | None = None

    @property
    def lean_only(self) -> bool:
        """Whether it changes only what the lean block keeps (so it is run for lean-block rows only)."""
        return not self.keep_mid or self.keep_dtype is not None


# --memory: its modes
MEMORY_MODES: dict[str, MemoryMode] = {
    "default": MemoryMode(True, False),  # the lean block keeps x and x1; AdamW steps after backward
    "keep_input": MemoryMode(False, False),  # the lean block keeps its input alone (crs.keep_mid=false)
    "in_backward": MemoryMode(True, True),  # each parameter's AdamW update in backward (optim.in_backward)
    "floor": MemoryMode(False, True),  # both
    "bf16_stream": MemoryMode(True, False, "bfloat16"),  # x and x1 kept in bfloat16 (crs.keep_dtype)
    "keep_input_bf16": MemoryMode(False, False, "bfloat16"),  # the input alone, in bfloat16
    "floor_bf16": MemoryMode(False, True, "bfloat16"),  # the input alone in bfloat16, AdamW inside backward
}

GRIDS: dict[str, dict[str, tuple]] = {
    # CPU: saved-for-backward bytes of every target set and ratio, one sampler (the bytes do not depend on it)
    "quick": {
        "methods": ("wta_crs",),
        "ratios": RATIOS,
        "targets": BENCH_TARGET_SETS,
        "attn": ATTNS,
        "precision": PRECISIONS,
        "checkpointing": (False,),
        "memory": ("default",),
    },
    # GPU table: both samplers (they differ in speed), with and without gradient checkpointing
    "full": {
        "methods": METHODS,
        "ratios": RATIOS,
        "targets": BENCH_TARGET_SETS,
        "attn": ATTNS,
        "precision": PRECISIONS,
        "checkpointing": (False, True),
        "memory": ("default",),
    },
}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked configuration. method "exact" (ratio 1, no targets), "crs" or "wta_crs"; memory: a
    mode of `MEMORY_MODES`."""

    method: str
    ratio: float
    targets: str  # a vitcrs.crs.TARGET_SETS name, or "-" for exact
    attn: str
    precision: str
    checkpointing: bool
    memory: str = "default"

    @property
    def keep_mid(self) -> bool:
        return MEMORY_MODES[self.memory].keep_mid

    @property
    def in_backward(self) -> bool:
        return MEMORY_MODES[self.memory].in_backward

    @property
    def exact(self) -> bool:
        return self.method == "exact"

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16-mixed"

    @property
    def target_names(self) -> tuple[str, ...]:
        return () if self.exact else TARGET_SETS[self.targets]

    @property
    def modelled(self) -> bool:
        """Whether the analytic block model covers this row: no checkpointing, or the lean block (which
        checkpointing does not wrap; it then keeps only its input)."""
        return not self.checkpointing or "lean_block" in self.target_names

    @property
    def crs_config(self) -> CRSConfig | None:
        """The sampling the targets are injected with; None for exact."""
        if self.exact:
            return None
        keep_dtype = MEMORY_MODES[self.memory].keep_dtype
        return CRSConfig(ratio=self.ratio, method=self.method, keep_mid=self.keep_mid, keep_dtype=keep_dtype)

    @property
    def reference(self) -> BenchConfig:
        """The exact run every ratio is taken against: same attention and precision, no checkpointing."""
        return exact_config(self.attn, self.precision, False)

    @property
    def name(self) -> str:
        what = "exact" if self.exact else f"{self.method}@{self.ratio:g}/{self.targets}"
        memory = "" if self.memory == "default" else f"/{self.memory}"
        return f"{self.attn}/{self.precision}/{what}" + ("/ckpt" if self.checkpointing else "") + memory

    def skip_reason(self) -> str | None:
        """Why this combination cannot run, or None."""
        matmuls = [t for t in self.target_names if t in MATMUL_TARGETS]
        if matmuls and self.attn != "eager":
            return (
                f"target set '{self.targets}' samples the attention matmuls ({', '.join(matmuls)}), which "
                f"exist only with eager attention, not {self.attn}"
            )
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "target_names": list(self.target_names)}


def exact_config(attn: str, precision: str, checkpointing: bool) -> BenchConfig:
    return BenchConfig("exact", 1.0, "-", attn, precision, checkpointing)


def expand(
    methods: Sequence[str],
    ratios: Sequence[float],
    targets: Sequence[str],
    attn: Sequence[str],
    precision: Sequence[str],
    checkpointing: Sequence[bool],
    memory: Sequence[str] = ("default",),
) -> list[BenchConfig]:
    """Every combination, attention → precision → checkpointing → method → targets → ratio → memory mode.

    The exact reference (no checkpointing, default memory) of each attention × precision is always included,
    first; invalid combinations are kept (their `skip_reason()` says why) so the report can list them. A
    memory mode that changes what the lean block keeps (its input alone, a bfloat16 stream) is run for
    lean-block rows only (it changes nothing else); one that only updates in backward for every row, exact
    ones included.
    """
    out: list[BenchConfig] = []

    def modes(lean: bool) -> list[str]:
        return [mode for mode in memory if lean or not MEMORY_MODES[mode].lean_only]

    for a in attn:
        for p in precision:
            out.append(exact_config(a, p, False))
            for ckpt in checkpointing:
                out += [BenchConfig("exact", 1.0, "-", a, p, bool(ckpt), mem) for mem in modes(False)]
                for m in methods:
                    for t in targets:
                        lean = "lean_block" in TARGET_SETS[t]
                        for r in ratios:
                            out += [BenchConfig(m, float(r), t, a, p, bool(ckpt), mem) for mem in modes(lean)]
    return list(dict.fromkeys(out))
