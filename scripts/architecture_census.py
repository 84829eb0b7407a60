"""Structure counts of a checkout: `python scripts/architecture_census.py [REPO]` (default: this one).

Prints the lines of train.py, the data module's constructor arguments, the lines of src/, conf/ and scripts/
that spell out a target set (three or more target names in one list: a proxy, docstrings included), and the
quoted literals of metrics.json keys that name nothing else, per file of src/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TARGETS = ("query", "key", "value", "attn_output", "fc1", "fc2", "scores", "context", "mlp", "lean_block")
METRICS_KEYS = (
    "label_type", "num_classes", "val_acc", "test_acc", "peak_mem_allocated_gib", "peak_mem_reserved_gib",
    "peak_mem_allocated_gib_per_rank", "peak_mem_reserved_gib_per_rank", "saved_bytes_per_step",
    "saved_bytes_per_step_exact", "images_per_s", "fidelity_rel_err", "fidelity_cos", "wall_time_s",
    "world_size", "epochs", "versions", "settings",
)  # fmt: skip


def main(root: Path) -> None:
    print("train.py lines:", (root / "src/vitcrs/train.py").read_text().count("\n"))
    probe = "import inspect; from vitcrs.data.datamodule import VisionDataModule as D; "
    probe += "print(len(inspect.signature(D.__init__).parameters) - 1)"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    print("VisionDataModule constructor arguments:", out.stdout.strip() or out.stderr[-300:])
    scripts = [p for p in root.glob("scripts/*") if p.name != Path(__file__).name]  # (not its own lists)
    files = [*root.glob("src/**/*.py"), *root.glob("conf/**/*.yaml"), *scripts]
    hits = []
    for path in sorted(files):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            named = {t for t in TARGETS if re.search(rf"(?<![\w.]){t}(?!\w)", line)}
            if len(named) >= 3 and re.search(r"[\[(,]", line):
                hits.append(f"{path.relative_to(root)}:{i}")
    print("lines spelling out a target set:", len(hits), *(f"\n    {h}" for h in hits))
    counts = {}
    for path in sorted(root.glob("src/**/*.py")):
        text = path.read_text()
        n = sum(len(re.findall(rf"[\"']{k}[\"']", text)) for k in METRICS_KEYS)
        if n:
            counts[str(path.relative_to(root))] = n
    print(f"quoted metrics-key literals in src/: {sum(counts.values())} in {len(counts)} files")
    for name, n in counts.items():
        print(f"    {name} {n}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve())
