"""Small shared helpers: text tables."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", "").replace("x", "").replace("%", ""))
        return True
    except ValueError:
        return s in ("-", "")
