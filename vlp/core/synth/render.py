"""How a scene looks: shapes drawn anti-aliased on a plain background."""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image, ImageDraw

from vlp.core.synth.world import COLOURS, Scene

Point = tuple[float, float]


def _star(cx: float, cy: float, r: float) -> list[Point]:
    # Five points, tip up; a fat inner radius keeps the points visible when small.
    cy += 0.095 * r  # centre the star's bounding box (its bottom tips sit at 0.81 r)
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.47 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _triangle(cx: float, cy: float, r: float) -> list[Point]:
    # Equilateral, tip up, as large as the box allows, shifted so its box is centred.
    big = 1.15 * r
    cy += big / 4
    return [(cx, cy - big), (cx - 0.866 * big, cy + big / 2), (cx + 0.866 * big, cy + big / 2)]


def _square(cx: float, cy: float, r: float) -> list[Point]:
    h = 0.85 * r  # a full-box square would look much heavier than a circle of the same size
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def _diamond(cx: float, cy: float, r: float) -> list[Point]:
    w = 0.75 * r  # taller than wide, so it never reads as a tilted square
    return [(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)]


def _cross(cx: float, cy: float, r: float) -> list[Point]:
    t = 0.32 * r  # half the arm thickness
    return [
        (cx - t, cy - r),
        (cx + t, cy - r),
        (cx + t, cy - t),
        (cx + r, cy - t),
        (cx + r, cy + t),
        (cx + t, cy + t),
        (cx + t, cy + r),
        (cx - t, cy + r),
        (cx - t, cy + t),
        (cx - r, cy + t),
        (cx - r, cy - t),
        (cx - t, cy - t),
    ]


_POLYGONS: dict[str, Callable[[float, float, float], list[Point]]] = {
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "diamond": _diamond,
    "cross": _cross,
}


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image of size x size pixels.

    Drawn `supersample` times larger and shrunk with LANCZOS, so edges are
    anti-aliased like a photo's instead of jagged; a tiny model then learns
    shapes rather than aliasing patterns.
    """
    big = size * supersample
    image = Image.new("RGB", (big, big), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, obj.size * big / 2
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_POLYGONS[obj.shape](cx, cy, r), fill=fill)
    if supersample == 1:
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS)


