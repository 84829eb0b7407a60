"""The one table writer: Markdown (GitHub pipe tables) and LaTeX (booktabs) lines from a header and rows.

Cells are strings, taken as they are (already formatted, and escaped for the target by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int | None = None
) -> list[str]:
    """The lines of a Markdown table; with `left`, its first `left` columns are left-aligned and the others
    right-aligned, else no column has an alignment."""
    align = ["---"] * len(header) if left is None else ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def latex_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, left: int = 1
) -> list[str]:
    """The lines of a booktabs `table` environment with `caption`; the first `left` columns left-aligned, the
    others right-aligned."""
    spec = "l" * left + "r" * (len(header) - left)
    return [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{caption}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
        *(" & ".join(r) + r" \\" for r in rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
