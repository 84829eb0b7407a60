"""The ops `inject` can sample (target names), their check (`validate_targets`), and the named target sets.

`TARGET_SETS` is the one catalogue of named sets: conf (`${vitcrs.targets:study}`), `python -m vitcrs.bench
--targets`, `python -m vitcrs.fidelity` (`targets: study`) and the scripts name a set from it.
"""

from __future__ import annotations

from collections.abc import Iterable

QKV_TARGETS = ("query", "key", "value")
LINEAR_TARGETS = (*QKV_TARGETS, "attn_output", "fc1", "fc2")
MATMUL_TARGETS = ("scores", "context")
ALL_TARGETS = LINEAR_TARGETS + MATMUL_TARGETS
LEAN_TARGETS = ("mlp",)  # LayerNorm + MLP storing only the norm's input (the rest recomputed in backward)
# the whole block as one op keeping only the residual stream; it samples all six linears itself (stands alone)
BLOCK_TARGETS = ("lean_block",)
KNOWN_TARGETS = ALL_TARGETS + LEAN_TARGETS + BLOCK_TARGETS
_LEAN = (*QKV_TARGETS, "attn_output", *LEAN_TARGETS)

TARGET_SETS: dict[str, tuple[str, ...]] = {
    # the study's: q/k/v (one shared sample) and the attention matmuls Q Kᵀ and P V (eager attention only)
    "study": (*QKV_TARGETS, *MATMUL_TARGETS),
    "qkv": QKV_TARGETS,  # the three input projections, one shared sample of the block input
    "matmuls": MATMUL_TARGETS,  # the two attention matmuls alone (eager attention only)
    "linears": LINEAR_TARGETS,  # every linear of a block
    "all": ALL_TARGETS,  # every linear and both attention matmuls (eager attention only)
    # q/k/v, attention output and the memory-lean MLP (`crs_mlp`: keeps only the input of the LayerNorm
    # before it, recomputes that norm and the hidden activation in backward) in place of fc1/fc2
    "lean": _LEAN,
    "lean_all": (*_LEAN, *MATMUL_TARGETS),  # "lean" + both attention matmuls (eager attention only)
    # the lean block (`lean_vit_block`, conf's default): each block keeps only its residual stream, every
    # activation gradient exact, the six linears' weight gradients sampled with p ∝ ‖g‖·‖x‖
    "lean_block": BLOCK_TARGETS,
}


def target_set(name: str) -> tuple[str, ...]:
    """The targets of the set `name` in `TARGET_SETS`; ValueError naming the sets when there is none."""
    if name not in TARGET_SETS:
        raise ValueError(f"no target set named {name!r}: the sets are {', '.join(TARGET_SETS)}.")
    return TARGET_SETS[name]


def validate_targets(targets: Iterable[str], attn_implementation: str | None) -> tuple[str, ...]:
    """Check target names (and that matmul targets have eager attention); return them in canonical order."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    unknown = [t for t in targets if t not in KNOWN_TARGETS]
    if unknown:
        raise ValueError(f"crs.targets has unknown names {unknown}: allowed are {list(KNOWN_TARGETS)}.")
    matmuls = [t for t in targets if t in MATMUL_TARGETS]
    if matmuls and (attn_implementation or "eager") != "eager":
        raise ValueError(
            f"crs.targets {matmuls} sample the attention matmuls, which only exist with eager attention, but "
            f"model.attn_implementation={attn_implementation!r}. Set model.attn_implementation=eager, or "
            f"drop {matmuls} from crs.targets."
        )
    if "mlp" in targets and {"fc1", "fc2"} & set(targets):
        raise ValueError(
            "crs.targets has 'mlp' together with 'fc1'/'fc2': 'mlp' already samples both MLP linears and "
            "recomputes their hidden activation; keep either 'mlp' or 'fc1'/'fc2'."
        )
    if "lean_block" in targets and len(set(targets)) > 1:
        others = sorted(set(targets) - {"lean_block"})
        raise ValueError(
            f"crs.targets has 'lean_block' together with {others}: 'lean_block' already samples all six "
            "linears of a block and recomputes its attention and MLP; use it alone."
        )
    return tuple(t for t in KNOWN_TARGETS if t in targets)
