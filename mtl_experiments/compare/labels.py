"""Point labels that do not collide: each label takes the first of a few offsets around its point whose box overlaps
no label placed before it, no marker and stays inside the axes (greedy placement, as in cartographic label
placement's fixed-position model; Christensen, Marks & Shieber, ACM TOG 1995, without their annealing)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _candidates() -> list[tuple[tuple[float, float], str, str]]:
    """Offsets in points (dx, dy) with the alignment that keeps the label on that side of its point: the four
    corners first, then rings of twelve directions further out (joined to the point by a leader line)."""
    out = [
        ((6, 4), "left", "bottom"),
        ((6, -4), "left", "top"),
        ((-6, 4), "right", "bottom"),
        ((-6, -4), "right", "top"),
    ]
    for radius in (14, 24, 36, 50):
        for k in range(12):
            angle = math.pi * k / 6
            dx, dy = radius * math.cos(angle), radius * math.sin(angle)
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
            out.append(((round(dx, 1), round(dy, 1)), ha, va))
    return out


CANDIDATES = _candidates()


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    """How much of ``box`` (area) lies outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 7) -> list:
    """Annotate each (x, y) point with its text where it collides least (ideally nowhere); returns the annotations.

    The figure's layout must be final (drawn once) so that display coordinates hold; the annotations are left out
    of the layout, so drawing again does not move the axes under them."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    size = fontsize * fig.dpi / 72  # a marker's half-width is about half the font size here
    markers = []
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - size / 2, py - size / 2, px + size / 2, py + size / 2))
    placed, annotations = [], []
    for (x, y), text in zip(points, texts, strict=True):
        best = None
        for offset, ha, va in CANDIDATES:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=fontsize)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            cost = _outside(box, frame) * 10 + sum(_overlap(box, o) for o in placed + markers)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
        annotations.append(_with_leader(ax, best[1]))
    return annotations


def _with_leader(ax, ann):
    """A label set further off than the nearest offsets is tied to its point by a thin leader line (measured
    without it: an annotation's extent would include its arrow)."""
    if max(map(abs, ann.xyann)) <= 10:
        return ann
    ann.remove()
    leader = {"arrowstyle": "-", "color": "0.6", "lw": 0.5, "shrinkA": 0, "shrinkB": 3}
    kwargs = {"ha": ann.get_ha(), "va": ann.get_va(), "fontsize": ann.get_fontsize(), "arrowprops": leader}
    new = ax.annotate(ann.get_text(), ann.xy, textcoords="offset points", xytext=ann.xyann, **kwargs)
    new.set_in_layout(False)
    return new
