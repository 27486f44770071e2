"""A flame graph as one self-contained SVG, from collapsed stacks (py-spy's raw format).

Root at the bottom, callers below callees, width proportional to samples; hovering a frame
shows its name, samples and share. No scripts or external assets, so it opens anywhere.
"""

from __future__ import annotations

import zlib
from collections import Counter
from html import escape

WIDTH, ROW, FONT = 1200, 16, 11
MIN_WIDTH = 0.5  # pixels: narrower frames are not drawn


def _tree(stacks: Counter[tuple[str, ...]]) -> dict:
    root: dict = {"count": 0, "children": {}}
    for stack, count in stacks.items():
        node = root
        node["count"] += count
        for frame in stack:
            node = node["children"].setdefault(frame, {"count": 0, "children": {}})
            node["count"] += count
    return root


def _colour(name: str) -> str:
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{(h >> 8) % 180 + 40},{(h >> 16) % 55})"


def render(stacks: Counter[tuple[str, ...]], title: str) -> str:
    root = _tree(stacks)
    total = root["count"] or 1
    rects: list[str] = []
    depth_max = 0
    todo = [(root, 0, 0.0)]
    while todo:
        node, depth, x = todo.pop()
        for name, child in sorted(node["children"].items()):
            width = WIDTH * child["count"] / total
            if width >= MIN_WIDTH:
                depth_max = max(depth_max, depth + 1)
                rects.append(_rect(name, child["count"], total, x, depth, width))
                todo.append((child, depth + 1, x))
            x += width
    height = (depth_max + 2) * ROW
    body = "\n".join(rects)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" '
        f'font-size="{FONT}"><rect width="100%" height="100%" fill="#fff"/>'
        f'<text x="4" y="{ROW - 4}">{escape(title)}: {total} samples</text>'
        f'<g transform="translate(0,{height}) scale(1,-1)">{body}</g></svg>\n'
    )


def _rect(name: str, count: int, total: int, x: float, depth: int, width: float) -> str:
    y = depth * ROW
    label = escape(name)
    chars = int(width / (FONT * 0.62))
    text = label if len(name) <= chars else (escape(name[: chars - 2]) + ".." if chars > 3 else "")
    # Text is drawn upright inside the flipped group.
    caption = f'<text x="{x + 2:.1f}" y="{-(y + 4)}" transform="scale(1,-1)">{text}</text>' if text else ""
    return (
        f"<g><title>{label} ({count} samples, {100 * count / total:.1f}%)</title>"
        f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 1}" fill="{_colour(name)}"/>{caption}</g>'
    )
