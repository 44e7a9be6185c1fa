"""What several benchmarks share: the process's peak resident set (Linux VmHWM) and the markdown
tables they print and the docs carry."""

from __future__ import annotations

from typing import Iterable


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM of /proc/self/status; 0 where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    """Reset the process's peak resident set to its current one (Linux clear_refs 5); returns it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss()


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """`| a | b |`, `|---|---|`, then one line per row of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
