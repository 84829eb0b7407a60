"""Command line of `python -m vitcrs.bench`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch

from vitcrs.crs import METHODS, TARGET_SETS
from vitcrs.errors import ConfigError
from vitcrs.models import model_family

from .grid import ATTNS, GRIDS, MEMORY_MODES, PRECISIONS, expand
from .measure import MODELS, ModelSpec, model_configs
from .render import markdown
from .runner import BenchOptions, run_bench

_SWITCH = {"off": False, "on": True, "no": False, "yes": True, "false": False, "true": True}


def _choices(flag: str, allowed: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: choose a comma-separated subset of {', '.join(allowed)}"
            )
        return items

    return parse


def _ratios(text: str) -> tuple[float, ...]:
    try:
        items = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        items = ()
    if not items or not all(0.0 < r < 1.0 for r in items):
        raise argparse.ArgumentTypeError(
            f"--ratios {text!r}: give comma-separated ratios in (0, 1), e.g. 0.5,0.3 (exact always runs)"
        )
    return items


def _switches(text: str) -> tuple[bool, ...]:
    items = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    if not items or any(s not in _SWITCH for s in items):
        raise argparse.ArgumentTypeError(f"--checkpointing {text!r}: give off, on or off,on")
    return tuple(dict.fromkeys(_SWITCH[s] for s in items))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitcrs.bench",
        description="Memory and speed of exact vs CRS / WTA-CRS training steps of a ViT, one "
        "configuration after the other on one synthetic batch. On CUDA: peak memory, images/s and "
        "saved-for-backward bytes; on CPU: saved-for-backward bytes, and with --cpu-peak the peak bytes of "
        "live tensors and where they go (weights, optimizer state, batch, gradients, kept activations, "
        "transient workspace). Writes bench.json and bench.md "
        "and prints the table.",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="vit_b16",
        help=f"a Hugging Face ViT shape at random init ({', '.join(MODELS)}; default vit_b16), a model "
        f"config as in training ({', '.join(model_configs())}: any family), or a timm model name at random "
        "init (e.g. vit_small_patch16_224; needs timm)",
    )
    m.add_argument(
        "--model-path", help="local Hugging Face ViT, DeiT or DINOv2 checkpoint directory (overrides --model)"
    )
    m.add_argument("--layers", type=int, help="override the number of encoder blocks")
    m.add_argument("--image-size", type=int, help="override the image size (default: the model's)")
    m.add_argument("--patch-size", type=int, help="override the patch size (default: the model's)")
    m.add_argument("--num-labels", type=int, default=10, help="classifier classes (default 10)")
    g = p.add_argument_group("configurations (flags override the grid's lists)")
    g.add_argument("--grid", choices=tuple(GRIDS), default="quick", help="preset: quick (CPU), full (GPU)")
    g.add_argument("--methods", type=_choices("--methods", METHODS), help="crs,wta_crs")
    g.add_argument("--ratios", type=_ratios, help="e.g. 0.5,0.3,0.1")
    g.add_argument("--targets", type=_choices("--targets", tuple(TARGET_SETS)), help=",".join(TARGET_SETS))
    g.add_argument("--attn", type=_choices("--attn", ATTNS), help="eager,sdpa")
    g.add_argument("--precision", type=_choices("--precision", PRECISIONS), help="fp32,bf16-mixed")
    g.add_argument("--checkpointing", type=_switches, help="off, on or off,on")
    g.add_argument(
        "--memory",
        type=_choices("--memory", tuple(MEMORY_MODES)),
        help="memory modes, comma-separated: default (the lean block keeps x and x1; AdamW after backward), "
        "keep_input (the lean block keeps its input alone: crs.keep_mid=false), in_backward (each "
        "parameter's AdamW update inside backward: optim.in_backward=true; every row), floor (both), "
        "bf16_stream, keep_input_bf16, floor_bf16 (the same with the kept stream in bfloat16: "
        "crs.keep_dtype=bfloat16)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--warmup", type=int, default=3, help="warm-up steps per configuration")
    r.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    r.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--time-on-cpu", action="store_true", help="on CPU, run and time the training steps too")
    r.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timing rounds: after the first pass, every configuration's warm-up + timed steps run again "
        "N-1 times, configurations interleaved round by round, so that drift on a shared machine hits all "
        "alike; images/s is taken over all rounds' steps (default 1)",
    )
    r.add_argument(
        "--cpu-peak",
        action="store_true",
        help="on CPU, measure the peak bytes of live tensors in one training step (profiler memory events)",
    )
    r.add_argument("--find-max-batch", action="store_true", help="largest batch within --memory-budget-gib")
    r.add_argument("--memory-budget-gib", type=float)
    r.add_argument("--out", type=Path, help="output folder (default outputs/bench/<timestamp>)")
    return p


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The network the flags name (--model / --model-path, the shape overrides); its model node is checked
    (ConfigError: an unknown --model, a missing package, a bad model config)."""
    overrides = {
        k: v
        for k, v in (
            ("num_hidden_layers", args.layers),
            ("image_size", args.image_size),
            ("patch_size", args.patch_size),
        )
        if v is not None
    }
    spec = ModelSpec(args.model, args.model_path, args.num_labels, overrides)
    spec.family  # noqa: B018  (checks the node)
    return spec


def _check(args: argparse.Namespace) -> None:
    for name in ("batch_size", "steps", "rounds"):
        v = getattr(args, name)
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={v} is invalid: it must be >= 1.")
    if args.warmup < 0:
        raise ConfigError(f"--warmup={args.warmup} is invalid: it must be >= 0.")
    for name in ("layers", "image_size", "patch_size", "num_labels"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={v} is invalid: it must be >= 1.")
    if args.find_max_batch and not (args.memory_budget_gib and args.memory_budget_gib > 0):
        raise ConfigError("--find-max-batch needs --memory-budget-gib X with X > 0 (e.g. 16).")
    if args.model_path and not (Path(args.model_path) / "config.json").is_file():
        raise ConfigError(f"--model-path={args.model_path!r} is not a folder with a Hugging Face checkpoint.")
    spec = model_spec(args)
    if args.image_size:  # a checkpoint at another size interpolates its position embeddings: whole patches
        node = spec.model_node("eager")
        patch = model_family(node).inputs(node).patch_size
        if args.image_size % patch:
            raise ConfigError(
                f"--image-size={args.image_size} is not a multiple of the patch size {patch}: e.g. "
                f"--image-size={max(patch, args.image_size // patch * patch)}."
            )
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={args.device} asked for CUDA, but torch sees no GPU: use --device cpu.")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(
            f"--out={str(args.out)!r} is a file: give a folder (created if missing) for bench.json and "
            "bench.md."
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        _check(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    grid = dict(GRIDS[args.grid])
    for key in ("methods", "ratios", "targets", "attn", "precision", "checkpointing", "memory"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    configs = expand(**grid)
    spec = model_spec(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = BenchOptions(
        batch_size=args.batch_size,
        warmup=args.warmup,
        steps=args.steps,
        seed=args.seed,
        time_on_cpu=args.time_on_cpu,
        rounds=args.rounds,
        cpu_peak=args.cpu_peak,
        find_max_batch=args.find_max_batch,
        memory_budget_gib=args.memory_budget_gib,
    )
    try:
        result = run_bench(configs, spec, opts, device, argv)
    except ConfigError as exc:  # the model's weights cannot be had (e.g. offline)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "bench.md").write_text(table)
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    errors = [r["name"] for r in result["rows"] if r["status"] == "error"]
    if errors:
        print(f"error: {len(errors)} configuration(s) failed: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0
