"""The configurations a benchmark runs: presets (`quick`, `full`), subsets, and invalid combinations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vitcrs.crs import MATMUL_TARGETS, METHODS, TARGET_SETS, CRSConfig

# the target sets (names in vitcrs.crs.TARGET_SETS) the presets run; --targets takes any set of the catalogue
BENCH_TARGET_SETS = ("study", "linears", "all", "lean", "lean_all", "lean_block")
ATTNS = ("eager", "sdpa")
PRECISIONS = ("fp32", "bf16-mixed")
RATIOS = (0.5, 0.3, 0.1)

GRIDS: dict[str, dict[str, tuple]] = {
    # CPU: saved-for-backward bytes of every target set and ratio, one sampler (the bytes do not depend on it)
    "quick": {
        "methods": ("wta_crs",),
        "ratios": RATIOS,
        "targets": BENCH_TARGET_SETS,
        "attn": ATTNS,
        "precision": PRECISIONS,
        "checkpointing": (False,),
    },
    # GPU table: both samplers (they differ in speed), with and without gradient checkpointing
    "full": {
        "methods": METHODS,
        "ratios": RATIOS,
        "targets": BENCH_TARGET_SETS,
        "attn": ATTNS,
        "precision": PRECISIONS,
        "checkpointing": (False, True),
    },
}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked configuration. method "exact" (ratio 1, no targets), "crs" or "wta_crs"."""

    method: str
    ratio: float
    targets: str  # a vitcrs.crs.TARGET_SETS name, or "-" for exact
    attn: str
    precision: str
    checkpointing: bool

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
        return None if self.exact else CRSConfig(ratio=self.ratio, method=self.method)

    @property
    def reference(self) -> BenchConfig:
        """The exact run every ratio is taken against: same attention and precision, no checkpointing."""
        return exact_config(self.attn, self.precision, False)

    @property
    def name(self) -> str:
        what = "exact" if self.exact else f"{self.method}@{self.ratio:g}/{self.targets}"
        return f"{self.attn}/{self.precision}/{what}" + ("/ckpt" if self.checkpointing else "")

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
) -> list[BenchConfig]:
    """Every combination, attention → precision → checkpointing → method → targets → ratio.

    The exact reference (no checkpointing) of each attention × precision is always included, first; invalid
    combinations are kept (their `skip_reason()` says why) so the report can list them.
    """
    out: list[BenchConfig] = []
    for a in attn:
        for p in precision:
            out.append(exact_config(a, p, False))
            for ckpt in checkpointing:
                if ckpt:
                    out.append(exact_config(a, p, True))
                for m in methods:
                    for t in targets:
                        for r in ratios:
                            out.append(BenchConfig(m, float(r), t, a, p, bool(ckpt)))
    return list(dict.fromkeys(out))
