"""Procedurally drawn ocean scenes, one recognisable motif per ConchShell class.

Every picture is drawn from a seeded ``numpy.random.Generator`` alone (colours, time of
day, positions, sizes, textures), so the same seed gives the same pixels. Scenes are
drawn at twice the requested size and downsampled, which anti-aliases PIL's hard edges.

- coast: sky, sea and horizon with a rocky cliff (sometimes a lighthouse) and surf.
- island: open sea with a small sandy, green island carrying palm trees.
- sand_beach: sand foreground, shoreline foam, a striped umbrella and a towel.
- coral_reef: bright water, sandy floor, colourful corals and fish.
- deep: dark water, light rays from far above, bubbles, marine snow and a glowing creature.
- ocean_wave: one big curling wave with a foaming lip under the sky.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from conchshell.constants import CLASS_NAMES

Colour = tuple[int, int, int]
SUPERSAMPLE = 2


# ---------------------------------------------------------------------------- helpers


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 12.0) -> Colour:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in colour)  # type: ignore[return-value]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _gradient(width: int, height: int, top: Sequence[float], bottom: Sequence[float], power: float = 1.0) -> np.ndarray:
    """Vertical colour ramp as a float array [height, width, 3]."""
    t = np.linspace(0.0, 1.0, height)[:, None, None] ** power
    ramp = np.asarray(top, dtype=np.float32) * (1 - t) + np.asarray(bottom, dtype=np.float32) * t
    return np.broadcast_to(ramp, (height, width, 3)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid_w, grid_h = max(2, cells), max(2, int(cells * height / width))
    coarse = rng.uniform(0, 255, size=(grid_h, grid_w)).astype(np.uint8)
    fine = Image.fromarray(coarse, "L").resize((width, height), Image.BICUBIC)
    return np.asarray(fine, dtype=np.float32) / 127.5 - 1.0


def _texture(rng: np.random.Generator, width: int, height: int, strength: float) -> np.ndarray:
    """Two octaves of value noise plus grain, scaled to +-strength, shape [h, w, 1]."""
    noise = 0.6 * _smooth_noise(rng, width, height, 8) + 0.3 * _smooth_noise(rng, width, height, 40)
    noise += 0.1 * rng.uniform(-1, 1, size=(height, width)).astype(np.float32)
    return (noise * strength)[:, :, None]


def _paste_array(image: Image.Image, pixels: np.ndarray, mask: Image.Image) -> None:
    """Paste an RGB float array into `image` where `mask` (L) is set."""
    layer = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image.paste(layer, (0, 0), mask)


def _polygon_mask(size: tuple[int, int], points: Sequence[tuple[float, float]], blur: float = 0.0) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def _overlay(image: Image.Image, draw_fn: Callable[[ImageDraw.ImageDraw], None], blur: float = 0.0) -> Image.Image:
    """Draw translucent shapes on a separate RGBA layer (optionally blurred) and composite."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw_fn(ImageDraw.Draw(layer))
    if blur > 0:
        layer = layer.filter(ImageFilter.GaussianBlur(blur))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _ridge(rng: np.random.Generator, x0: float, x1: float, y0: float, y1: float, steps: int, rough: float) -> list[tuple[float, float]]:
    """A jagged line from (x0, y0) to (x1, y1): a random walk pulled toward the straight line."""
    points, offset = [], 0.0
    for i in range(steps + 1):
        t = i / steps
        offset = 0.7 * offset + rng.normal(0, rough)
        points.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + offset * math.sin(math.pi * t)))
    return points


# ------------------------------------------------------------------------ sky and sea

_TIMES_OF_DAY = ("day", "morning", "sunset", "overcast")
_TIME_WEIGHTS = (0.5, 0.2, 0.2, 0.1)
# sky top, sky at horizon, sea far, sea near, sun
_PALETTES: dict[str, tuple[Colour, Colour, Colour, Colour, Colour]] = {
    "day": ((38, 105, 200), (175, 215, 245), (45, 125, 175), (12, 72, 125), (255, 252, 225)),
    "morning": ((95, 145, 215), (250, 215, 180), (80, 140, 175), (25, 80, 125), (255, 235, 190)),
    "sunset": ((55, 55, 125), (250, 145, 75), (125, 90, 110), (30, 40, 85), (255, 205, 110)),
    "overcast": ((135, 145, 160), (205, 210, 215), (95, 115, 125), (45, 65, 80), (235, 235, 230)),
}


def _palette(rng: np.random.Generator) -> tuple[str, list[Colour]]:
    time_of_day = _TIMES_OF_DAY[int(rng.choice(len(_TIMES_OF_DAY), p=_TIME_WEIGHTS))]
    return time_of_day, [_jitter(rng, c) for c in _PALETTES[time_of_day]]


def _sky(image: Image.Image, rng: np.random.Generator, horizon: int, palette: list[Colour], time_of_day: str) -> Image.Image:
    width, _ = image.size
    sky = _gradient(width, horizon, palette[0], palette[1], power=0.8)
    image.paste(Image.fromarray(sky.astype(np.uint8), "RGB"), (0, 0))
    if time_of_day != "overcast" and rng.random() < 0.8:
        x = rng.uniform(0.1, 0.9) * width
        y = horizon * (rng.uniform(0.75, 0.95) if time_of_day == "sunset" else rng.uniform(0.15, 0.6))
        r = rng.uniform(0.035, 0.06) * width
        sun = palette[4]

        def glow(draw: ImageDraw.ImageDraw) -> None:
            draw.ellipse((x - 3 * r, y - 3 * r, x + 3 * r, y + 3 * r), fill=sun + (70,))

        image = _overlay(image, glow, blur=r)
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=sun)
        # Keep the sun above the sea: the sea is painted after the sky.
    clouds = int(rng.integers(1, 6)) if time_of_day != "overcast" else int(rng.integers(6, 10))
    tint = _mix((255, 255, 255), palette[1], 0.35 if time_of_day == "sunset" else 0.1)

    def cloud_shapes(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(clouds):
            cx, cy = rng.uniform(0, width), rng.uniform(0.08, 0.75) * horizon
            scale = rng.uniform(0.06, 0.16) * width
            for _ in range(int(rng.integers(4, 8))):
                dx, dy = rng.normal(0, scale * 0.7), rng.normal(0, scale * 0.15)
                rx, ry = scale * rng.uniform(0.4, 0.8), scale * rng.uniform(0.2, 0.35)
                draw.ellipse((cx + dx - rx, cy + dy - ry, cx + dx + rx, cy + dy + ry), fill=tint + (int(rng.integers(150, 220)),))

    return _overlay(image, cloud_shapes, blur=width * 0.006)


def _sea(image: Image.Image, rng: np.random.Generator, top: int, bottom: int, palette: list[Colour]) -> Image.Image:
    width, height = image.size
    sea = _gradient(width, bottom - top, palette[2], palette[3], power=0.7)
    sea = sea + _texture(rng, width, bottom - top, 10.0)
    image.paste(Image.fromarray(np.clip(sea, 0, 255).astype(np.uint8), "RGB"), (0, top))
    light = _mix(palette[2], (255, 255, 255), 0.45)
    dark = _mix(palette[3], (0, 0, 0), 0.3)

    def ripples(draw: ImageDraw.ImageDraw) -> None:
        # Short strokes, longer and wider apart toward the viewer (perspective).
        for _ in range(int((bottom - top) * 1.2)):
            depth = rng.random() ** 1.6
            y = top + depth * (bottom - top)
            length = (0.01 + 0.06 * depth) * width
            x = rng.uniform(-length, width)
            colour = light if rng.random() < 0.55 else dark
            draw.line((x, y, x + length, y + rng.normal(0, 0.5)), fill=colour + (int(60 + 90 * depth),), width=max(1, int(1 + 2.5 * depth)))

    return _overlay(image, ripples)


def _foam_line(draw: ImageDraw.ImageDraw, rng: np.random.Generator, points: Sequence[tuple[float, float]], width: float) -> None:
    """Broken white surf along a line of points."""
    for x, y in points:
        for _ in range(3):
            rx, ry = rng.uniform(0.5, 1.5) * width, rng.uniform(0.2, 0.5) * width
            ox, oy = rng.normal(0, width), rng.normal(0, width * 0.3)
            draw.ellipse((x + ox - rx, y + oy - ry, x + ox + rx, y + oy + ry), fill=(250, 252, 255, int(rng.integers(120, 230))))


# -------------------------------------------------------------------------- classes


def _draw_coast(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    time_of_day, palette = _palette(rng)
    horizon = int(height * rng.uniform(0.36, 0.5))
    image = Image.new("RGB", (width, height))
    image = _sky(image, rng, horizon, palette, time_of_day)
    image = _sea(image, rng, horizon, height, palette)
    left = rng.random() < 0.5
    haze = _mix(palette[1], palette[2], 0.5)

    # A hazy headland on the far side gives the horizon depth.
    far = rng.uniform(0.25, 0.5) * width
    far_pts = _ridge(rng, 0, far, horizon - rng.uniform(0.03, 0.08) * height, horizon, 12, height * 0.006)
    if left:
        far_pts = [(width - x, y) for x, y in far_pts]
    ImageDraw.Draw(image).polygon(far_pts + [(width - far if left else far, horizon), (width if left else 0, horizon)], fill=_mix(haze, (90, 100, 110), 0.3))

    # The cliff: flat-ish top, steep jagged face toward the sea, base in the surf.
    reach = rng.uniform(0.35, 0.55) * width
    top_y = rng.uniform(0.12, 0.32) * height
    foot = reach * rng.uniform(1.0, 1.2)
    face = _ridge(rng, reach * 0.75, foot, top_y + height * 0.03, height * rng.uniform(0.72, 0.9), 18, width * 0.02)
    cliff = [(0, top_y + rng.uniform(-0.03, 0.03) * height)] + _ridge(rng, 0, reach * 0.8, top_y, top_y + height * 0.03, 10, height * 0.008)[1:] + face[1:] + [(foot + width * 0.02, height), (0, height)]
    if not left:
        cliff = [(width - x, y) for x, y in cliff]
    rock = _jitter(rng, [(120, 100, 80), (110, 105, 100), (150, 120, 90), (95, 85, 80)][int(rng.integers(4))], 15)
    shade = 0.55 if time_of_day != "overcast" else 0.7
    xs = np.linspace(0, 1, width)[None, :, None]
    across = xs if left else 1 - xs  # darker toward the sea-facing face
    pixels = np.asarray(rock, np.float32) * (1.0 - (1 - shade) * across) * np.ones((height, 1, 1), np.float32)
    strata = np.sin(np.linspace(0, rng.uniform(20, 40), height))[:, None, None] * 8.0
    pixels = pixels + strata + _texture(rng, width, height, 28.0)
    mask = _polygon_mask((width, height), cliff)
    # Cracks and ledges: dark near-vertical fissures and lit horizontal ledges, drawn on a
    # copy of the rock and pasted through the cliff mask so they never leave the rock.
    rock_layer = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    rdraw = ImageDraw.Draw(rock_layer)
    span = (0.0, foot) if left else (width - foot, float(width))
    for _ in range(int(rng.integers(10, 20))):
        x, y = rng.uniform(*span), rng.uniform(top_y, height)
        crack = _ridge(rng, x, x + rng.normal(0, 0.02) * width, y, y + rng.uniform(0.08, 0.3) * height, 8, width * 0.006)
        rdraw.line(crack, fill=_mix(rock, (0, 0, 0), 0.55), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(5, 10))):
        x, y = rng.uniform(*span), rng.uniform(top_y + 0.05 * height, height)
        rdraw.line((x, y, x + rng.uniform(0.05, 0.15) * width, y + rng.normal(0, 2)), fill=_mix(rock, (255, 240, 220), 0.3), width=2)
    image.paste(rock_layer, (0, 0), mask)
    draw = ImageDraw.Draw(image)
    grass = _jitter(rng, (70, 120, 50), 20)
    top_edge = cliff[: 11]
    draw.line([(float(x), float(y)) for x, y in top_edge], fill=grass, width=max(3, int(height * 0.025)))

    if rng.random() < 0.35:  # lighthouse on the cliff top
        x, y = top_edge[int(rng.integers(3, 8))]
        w, h = width * 0.025, height * rng.uniform(0.12, 0.18)
        for k in range(4):
            colour = (240, 240, 235) if k % 2 == 0 else (200, 40, 40)
            draw.rectangle((x - w, y - h * (k + 1) / 4, x + w, y - h * k / 4), fill=colour)
        draw.polygon([(x - w * 1.4, y - h), (x + w * 1.4, y - h), (x, y - h - w * 2)], fill=(60, 60, 60))
        draw.rectangle((x - w * 0.8, y - h - w * 0.9, x + w * 0.8, y - h), fill=(255, 235, 150))

    surf = [(x, y) for x, y in face[8:]]
    for _ in range(int(rng.integers(0, 4))):  # sea stacks off the foot of the cliff
        sx, sy = foot + rng.uniform(0.02, 0.18) * width, rng.uniform(0.72, 0.95) * height
        sw, sh = rng.uniform(0.02, 0.05) * width, rng.uniform(0.04, 0.12) * height
        stack = _ridge(rng, sx - sw, sx + sw, sy, sy, 8, sh * 0.1)
        stack = [(x, y - sh * max(0.0, math.sin(math.pi * (x - sx + sw) / (2 * sw))) ** 0.5) for x, y in stack]
        if not left:
            stack = [(width - x, y) for x, y in stack]
        draw.polygon(stack, fill=_mix(rock, (0, 0, 0), 0.35))
        surf.extend((sx + dx, sy) for dx in (-sw, 0.0, sw))
    if not left:
        surf = [(width - x, y) for x, y in surf]
    return _overlay(image, lambda d: _foam_line(d, rng, surf, width * 0.012), blur=1.0)


def _palm(draw: ImageDraw.ImageDraw, rng: np.random.Generator, base: tuple[float, float], height: float) -> None:
    lean = rng.uniform(-0.45, 0.45) * height
    bx, by = base
    trunk = [(bx + lean * (t**1.7), by - height * t) for t in np.linspace(0, 1, 14)]
    brown = _jitter(rng, (115, 85, 55), 15)
    for i in range(len(trunk) - 1):
        w = height * (0.07 - 0.035 * i / len(trunk))
        draw.line((trunk[i], trunk[i + 1]), fill=brown, width=max(2, int(w)))
        draw.line((trunk[i][0] - w / 2, trunk[i][1], trunk[i][0] + w / 2, trunk[i][1]), fill=_mix(brown, (0, 0, 0), 0.3), width=1)
    tx, ty = trunk[-1]
    green = _jitter(rng, (40, 130, 50), 20)
    for k in range(int(rng.integers(6, 9))):
        angle = -math.pi / 2 + (k / 7.0 - 0.5) * 2.6 + rng.normal(0, 0.15)
        length = height * rng.uniform(0.45, 0.7)
        spine = []
        for t in np.linspace(0, 1, 10):
            droop = 0.9 * length * t * t  # fronds bend down under their own weight
            spine.append((tx + math.cos(angle) * length * t, ty + math.sin(angle) * length * t + droop))
        leaf_colour = _mix(green, (0, 0, 0), rng.uniform(0, 0.3))
        for i in range(len(spine) - 1):
            w = length * 0.14 * math.sin(math.pi * (i + 1) / len(spine))
            draw.line((spine[i], spine[i + 1]), fill=leaf_colour, width=max(2, int(w)))
    for k in range(int(rng.integers(0, 4))):
        draw.ellipse((tx - height * 0.05 + k * height * 0.035, ty, tx + k * height * 0.035, ty + height * 0.05), fill=(90, 65, 35))


def _draw_island(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    time_of_day, palette = _palette(rng)
    horizon = int(height * rng.uniform(0.42, 0.56))
    image = Image.new("RGB", (width, height))
    image = _sky(image, rng, horizon, palette, time_of_day)
    image = _sea(image, rng, horizon, height, palette)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:  # a far island on the horizon
        fx, fw = rng.uniform(0.05, 0.95) * width, rng.uniform(0.06, 0.14) * width
        draw.chord((fx - fw, horizon - fw * 0.35, fx + fw, horizon + fw * 0.35), 180, 360, fill=_mix(palette[1], (60, 90, 70), 0.5))

    cx = rng.uniform(0.3, 0.7) * width
    water_y = horizon + rng.uniform(0.18, 0.32) * (height - horizon)
    half = rng.uniform(0.15, 0.27) * width
    sand = _jitter(rng, (232, 210, 160), 12)

    def reflection(d: ImageDraw.ImageDraw) -> None:
        d.ellipse((cx - half, water_y - half * 0.05, cx + half, water_y + half * 0.22), fill=_mix(palette[3], (0, 0, 0), 0.3) + (110,))

    image = _overlay(image, reflection, blur=4)
    draw = ImageDraw.Draw(image)
    draw.chord((cx - half, water_y - half * 0.22, cx + half, water_y + half * 0.12), 180, 360, fill=sand)
    foam = [(cx + half * t, water_y - half * 0.015 + abs(t) * half * 0.02) for t in np.linspace(-0.95, 0.95, 24)]
    image = _overlay(image, lambda d: _foam_line(d, rng, foam, width * 0.006), blur=1)
    draw = ImageDraw.Draw(image)
    bush = _jitter(rng, (50, 115, 55), 15)
    for _ in range(int(rng.integers(4, 8))):
        bx = cx + rng.uniform(-0.55, 0.55) * half
        r = rng.uniform(0.12, 0.25) * half
        draw.ellipse((bx - r, water_y - half * 0.18 - r * 0.8, bx + r, water_y - half * 0.1 + r * 0.2), fill=_mix(bush, (0, 0, 0), rng.uniform(0, 0.35)))
    for _ in range(int(rng.integers(1, 4))):
        base = (cx + rng.uniform(-0.5, 0.5) * half, water_y - half * 0.12)
        _palm(draw, rng, base, rng.uniform(0.55, 1.0) * half)
    return image


def _draw_sand_beach(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    time_of_day, palette = _palette(rng)
    horizon = int(height * rng.uniform(0.28, 0.4))
    shore = int(height * rng.uniform(0.5, 0.62))
    image = Image.new("RGB", (width, height))
    image = _sky(image, rng, horizon, palette, time_of_day)
    image = _sea(image, rng, horizon, shore + int(height * 0.05), palette)

    sand_colour = _jitter(rng, (225, 200, 150), 12)
    if time_of_day == "sunset":
        sand_colour = _mix(sand_colour, (240, 150, 100), 0.25)
    line = [(x, shore + math.sin(x / width * rng.uniform(6, 14) + rng.uniform(0, 6)) * height * 0.012) for x in np.linspace(0, width, 40)]
    sand = _gradient(width, height, sand_colour, _mix(sand_colour, (255, 240, 210), 0.3)) + _texture(rng, width, height, 14.0)
    _paste_array(image, sand, _polygon_mask((width, height), line + [(width, height), (0, height)]))
    wet = [(x, y + height * 0.035) for x, y in line]
    image = _overlay(image, lambda d: d.polygon(line + wet[::-1], fill=(120, 100, 80, 90)), blur=3)
    image = _overlay(image, lambda d: _foam_line(d, rng, line, width * 0.01), blur=1.2)
    draw = ImageDraw.Draw(image)

    # Towel: a striped rectangle drawn flat, then squashed and rotated into perspective.
    tw, th = int(width * rng.uniform(0.16, 0.24)), int(height * rng.uniform(0.2, 0.28))
    towel = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
    tdraw = ImageDraw.Draw(towel)
    colours = [_jitter(rng, c, 20) for c in [(220, 50, 60), (250, 250, 245), (40, 110, 200), (250, 200, 40), (40, 170, 120)]]
    a, b = rng.choice(len(colours), size=2, replace=False)
    stripes = int(rng.integers(4, 9))
    for k in range(stripes):
        tdraw.rectangle((0, k * th / stripes, tw, (k + 1) * th / stripes), fill=colours[a if k % 2 == 0 else b] + (255,))
    towel = towel.resize((tw, int(th * 0.55))).rotate(float(rng.uniform(-30, 30)), expand=True, resample=Image.BICUBIC)
    tx, ty = int(rng.uniform(0.05, 0.6) * width), int(rng.uniform(0.7, 0.85) * height)
    image.paste(towel, (tx, ty - towel.size[1] // 2), towel)

    # Umbrella: shadow, pole, striped canopy.
    ux = rng.uniform(0.25, 0.85) * width
    ground = rng.uniform(0.75, 0.92) * height
    span = rng.uniform(0.13, 0.2) * width
    pole = rng.uniform(0.25, 0.35) * height
    image = _overlay(image, lambda d: d.ellipse((ux - span, ground - span * 0.15, ux + span * 0.8, ground + span * 0.2), fill=(60, 45, 30, 90)), blur=4)
    draw = ImageDraw.Draw(image)
    tilt = rng.uniform(-0.15, 0.15) * pole
    draw.line((ux, ground, ux + tilt, ground - pole), fill=(235, 235, 230), width=max(2, int(width * 0.007)))
    top = (ux + tilt, ground - pole)
    a, b = rng.choice(len(colours), size=2, replace=False)
    segments = int(rng.integers(6, 10))
    bbox = (top[0] - span, top[1] - span * 0.45, top[0] + span, top[1] + span * 0.45)
    for k in range(segments):
        draw.pieslice(bbox, 180 + 180 * k / segments, 180 + 180 * (k + 1) / segments, fill=colours[a if k % 2 == 0 else b])
    draw.line((top[0] - span, top[1], top[0] + span, top[1]), fill=_mix(colours[a], (0, 0, 0), 0.35), width=2)
    if rng.random() < 0.5:  # beach ball
        bx, by, r = rng.uniform(0.1, 0.9) * width, rng.uniform(0.72, 0.95) * height, width * 0.025
        for k, c in enumerate([(230, 40, 40), (250, 250, 250), (40, 90, 220), (250, 210, 30)]):
            draw.pieslice((bx - r, by - r, bx + r, by + r), k * 90, (k + 1) * 90, fill=c)
    for _ in range(int(rng.integers(2, 7))):  # shells and pebbles
        sx, sy, r = rng.uniform(0, width), rng.uniform(shore + 0.08 * height, height), width * rng.uniform(0.004, 0.01)
        draw.ellipse((sx - r, sy - r * 0.7, sx + r, sy + r * 0.7), fill=_jitter(rng, (245, 225, 215), 20))
    return image


_REEF_COLOURS: tuple[Colour, ...] = ((240, 90, 130), (255, 140, 60), (170, 80, 200), (235, 60, 70), (255, 215, 70), (90, 200, 170), (250, 170, 190))


def _branch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, angle: float, length: float, width: float, colour: Colour, depth: int) -> None:
    x2, y2 = x + math.cos(angle) * length, y + math.sin(angle) * length
    draw.line((x, y, x2, y2), fill=colour, width=max(1, int(width)))
    draw.ellipse((x2 - width / 2, y2 - width / 2, x2 + width / 2, y2 + width / 2), fill=colour)
    if depth > 0:
        for turn in (-1, 1):
            _branch(draw, rng, x2, y2, angle + turn * rng.uniform(0.25, 0.6), length * rng.uniform(0.6, 0.85), width * 0.75, colour, depth - 1)


def _fish(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, size: float) -> None:
    facing = 1 if rng.random() < 0.5 else -1
    kind = int(rng.integers(3))
    body = [_jitter(rng, c, 15) for c in [(255, 120, 30), (250, 215, 40), (40, 110, 230)]][kind]
    length, depth = size, size * (0.45 if kind != 2 else 0.35)
    tail = [(x - facing * length * 0.45, y), (x - facing * length * 0.85, y - depth * 0.55), (x - facing * length * 0.85, y + depth * 0.55)]
    draw.polygon(tail, fill=_mix(body, (0, 0, 0), 0.15))
    draw.ellipse((x - length / 2, y - depth / 2, x + length / 2, y + depth / 2), fill=body)
    if kind == 0:  # clownfish bands
        for offset in (-0.15, 0.2):
            bx = x + facing * offset * length
            draw.line((bx, y - depth * 0.45, bx, y + depth * 0.45), fill=(250, 250, 250), width=max(2, int(length * 0.08)))
    if kind == 2:  # yellow tail stripe
        draw.polygon(tail, fill=(250, 220, 50))
    draw.polygon([(x, y - depth * 0.45), (x - facing * length * 0.25, y - depth * 0.8), (x - facing * length * 0.3, y - depth * 0.35)], fill=_mix(body, (0, 0, 0), 0.2))
    ex, ey, er = x + facing * length * 0.3, y - depth * 0.08, max(1.5, length * 0.06)
    draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
    draw.ellipse((ex - er * 0.5, ey - er * 0.5, ex + er * 0.5, ey + er * 0.5), fill=(10, 10, 10))


def _draw_coral_reef(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top, bottom = _jitter(rng, (60, 190, 215), 20), _jitter(rng, (15, 75, 150), 15)
    water = _gradient(width, height, top, bottom) + _texture(rng, width, height, 8.0)
    image = Image.fromarray(np.clip(water, 0, 255).astype(np.uint8), "RGB")

    def rays(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(3, 7))):
            x, spread = rng.uniform(-0.2, 1.2) * width, rng.uniform(0.02, 0.06) * width
            slant = rng.uniform(-0.3, 0.3) * width
            draw.polygon([(x - spread, 0), (x + spread, 0), (x + slant + spread * 3, height), (x + slant - spread * 3, height)], fill=(255, 255, 255, 40))

    image = _overlay(image, rays, blur=width * 0.02)
    floor_y = rng.uniform(0.72, 0.82) * height
    floor = [(x, floor_y + math.sin(x / width * 9 + rng.uniform(0, 6)) * height * 0.02) for x in np.linspace(0, width, 30)]
    sand = _gradient(width, height, (215, 200, 150), (190, 170, 120)) + _texture(rng, width, height, 15.0)
    _paste_array(image, sand, _polygon_mask((width, height), floor + [(width, height), (0, height)]))
    draw = ImageDraw.Draw(image)

    for _ in range(int(rng.integers(6, 11))):
        x = rng.uniform(0.02, 0.98) * width
        y = floor_y + rng.uniform(-0.01, 0.12) * height
        colour = _jitter(rng, _REEF_COLOURS[int(rng.integers(len(_REEF_COLOURS)))], 15)
        kind = int(rng.integers(4))
        size = rng.uniform(0.12, 0.24) * height
        if kind == 0:  # branching coral
            for _ in range(int(rng.integers(2, 4))):
                _branch(draw, rng, x, y, -math.pi / 2 + rng.uniform(-0.5, 0.5), size * 0.45, width * 0.012, colour, 3)
        elif kind == 1:  # brain coral: a dome with winding grooves
            draw.chord((x - size * 0.6, y - size * 0.6, x + size * 0.6, y + size * 0.3), 180, 360, fill=colour)
            groove = _mix(colour, (0, 0, 0), 0.3)
            for k in range(4):
                r = size * (0.5 - k * 0.11)
                draw.arc((x - r, y - r * 0.95, x + r, y + r * 0.5), 190, 350, fill=groove, width=2)
        elif kind == 2:  # sea fan: fine lines fanning out
            for k in range(14):
                angle = -math.pi / 2 + (k / 13 - 0.5) * 1.8
                draw.line((x, y, x + math.cos(angle) * size, y + math.sin(angle) * size), fill=colour, width=2)
            draw.arc((x - size * 0.7, y - size * 0.7, x + size * 0.7, y + size * 0.7), 210, 330, fill=colour, width=2)
        else:  # tube sponges
            for k in range(int(rng.integers(2, 5))):
                tx = x + (k - 1.5) * size * 0.22
                th = size * rng.uniform(0.5, 1.0)
                draw.rounded_rectangle((tx - size * 0.09, y - th, tx + size * 0.09, y), radius=size * 0.08, fill=colour)
                draw.ellipse((tx - size * 0.07, y - th - size * 0.02, tx + size * 0.07, y - th + size * 0.05), fill=_mix(colour, (0, 0, 0), 0.45))
    for _ in range(int(rng.integers(4, 11))):
        _fish(draw, rng, rng.uniform(0.05, 0.95) * width, rng.uniform(0.15, 0.7) * height, rng.uniform(0.05, 0.11) * width)

    def bubbles(d: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(5, 20))):
            bx, by, r = rng.uniform(0, width), rng.uniform(0, floor_y), rng.uniform(0.003, 0.01) * width
            d.ellipse((bx - r, by - r, bx + r, by + r), outline=(230, 250, 255, 170), width=1)

    return _overlay(image, bubbles)


def _draw_deep(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top = _jitter(rng, (15, 45, 85), 10)
    water = _gradient(width, height, top, (2, 6, 16), power=0.6) + _texture(rng, width, height, 4.0)
    image = Image.fromarray(np.clip(water, 0, 255).astype(np.uint8), "RGB")

    def rays(draw: ImageDraw.ImageDraw) -> None:
        source = rng.uniform(0.2, 0.8) * width
        for _ in range(int(rng.integers(3, 6))):
            x, spread = source + rng.normal(0, 0.1) * width, rng.uniform(0.01, 0.03) * width
            end = x + rng.uniform(-0.4, 0.4) * width
            draw.polygon([(x - spread, 0), (x + spread, 0), (end + spread * 5, height * 0.8), (end - spread * 5, height * 0.8)], fill=(120, 170, 220, int(rng.integers(25, 50))))

    image = _overlay(image, rays, blur=width * 0.03)

    def snow(d: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(60, 150))):
            sx, sy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.5, 2.0)
            d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(200, 220, 240, int(rng.integers(40, 140))))
        bx = rng.uniform(0.1, 0.9) * width
        for k in range(int(rng.integers(6, 16))):
            r = rng.uniform(0.004, 0.012) * width
            x, y = bx + rng.normal(0, 0.015) * width, height * (1 - k / 16) - rng.uniform(0, 0.05) * height
            d.ellipse((x - r, y - r, x + r, y + r), outline=(170, 210, 240, 150), width=1)

    image = _overlay(image, snow)
    creature = int(rng.integers(3))
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.35, 0.7) * height
    size = rng.uniform(0.12, 0.22) * width
    glow = _jitter(rng, [(120, 220, 255), (200, 140, 255), (120, 255, 200)][int(rng.integers(3))], 20)
    if creature == 0:  # jellyfish: glowing bell and trailing tentacles

        def jelly(d: ImageDraw.ImageDraw) -> None:
            d.ellipse((cx - size * 0.9, cy - size * 0.8, cx + size * 0.9, cy + size * 0.6), fill=glow + (40,))

        image = _overlay(image, jelly, blur=size * 0.3)

        def body(d: ImageDraw.ImageDraw) -> None:
            d.chord((cx - size * 0.5, cy - size * 0.45, cx + size * 0.5, cy + size * 0.3), 180, 360, fill=glow + (150,))
            for k in range(7):
                x0 = cx - size * 0.42 + k * size * 0.14
                pts = [(x0 + math.sin(t * 6 + k) * size * 0.06, cy - size * 0.05 + t * size * 1.3) for t in np.linspace(0, 1, 12)]
                d.line(pts, fill=glow + (140,), width=2)

        image = _overlay(image, body, blur=0.8)
    elif creature == 1:  # anglerfish: dark body, teeth, glowing lure
        facing = 1 if rng.random() < 0.5 else -1
        lure = (cx + facing * size * 0.9, cy - size * 0.6)
        image = _overlay(image, lambda d: d.ellipse((lure[0] - size * 0.35, lure[1] - size * 0.35, lure[0] + size * 0.35, lure[1] + size * 0.35), fill=glow + (120,)), blur=size * 0.15)
        draw = ImageDraw.Draw(image)
        dark = (35, 40, 55)
        draw.polygon([(cx - facing * size * 0.45, cy), (cx - facing * size * 0.95, cy - size * 0.35), (cx - facing * size * 0.95, cy + size * 0.35)], fill=dark)
        draw.ellipse((cx - size * 0.6, cy - size * 0.45, cx + size * 0.6, cy + size * 0.45), fill=dark)
        draw.line([(cx + facing * size * 0.2, cy - size * 0.4), (cx + facing * size * 0.6, cy - size * 0.75), lure], fill=(70, 80, 95), width=2)
        mouth = cx + facing * size * 0.45
        for k in range(5):
            ty = cy + (k - 2) * size * 0.08
            draw.polygon([(mouth, ty), (mouth + facing * size * 0.1, ty + size * 0.03), (mouth, ty + size * 0.06)], fill=(230, 230, 220))
        draw.ellipse((lure[0] - size * 0.06, lure[1] - size * 0.06, lure[0] + size * 0.06, lure[1] + size * 0.06), fill=(255, 255, 230))
        ex, ey = cx + facing * size * 0.25, cy - size * 0.15
        draw.ellipse((ex - size * 0.06, ey - size * 0.06, ex + size * 0.06, ey + size * 0.06), fill=(200, 200, 180))
    else:  # whale silhouette against the light

        def whale(d: ImageDraw.ImageDraw) -> None:
            length = size * 2.4
            facing = 1 if rng.random() < 0.5 else -1
            d.ellipse((cx - length / 2, cy - length * 0.12, cx + length / 2, cy + length * 0.12), fill=(28, 42, 62, 240))
            tail_x = cx - facing * length * 0.5
            d.polygon([(tail_x, cy), (tail_x - facing * length * 0.18, cy - length * 0.12), (tail_x - facing * length * 0.12, cy), (tail_x - facing * length * 0.18, cy + length * 0.1)], fill=(28, 42, 62, 240))
            d.polygon([(cx, cy + length * 0.08), (cx - facing * length * 0.12, cy + length * 0.25), (cx + facing * length * 0.05, cy + length * 0.1)], fill=(28, 42, 62, 240))

        image = _overlay(image, whale, blur=1.5)
    return image


def _draw_ocean_wave(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    time_of_day, palette = _palette(rng)
    horizon = int(height * rng.uniform(0.3, 0.42))
    image = Image.new("RGB", (width, height))
    image = _sky(image, rng, horizon, palette, time_of_day)
    image = _sea(image, rng, horizon, height, palette)
    flip = rng.random() < 0.5  # which way the wave breaks

    crest_x = rng.uniform(0.3, 0.5) * width
    crest_y = rng.uniform(0.08, 0.22) * height
    base_y = rng.uniform(0.78, 0.88) * height
    radius = (base_y - crest_y) * rng.uniform(0.28, 0.36)
    # Back of the wave: a long slope down to the right edge.
    back = [(crest_x + (width - crest_x) * t, crest_y + (horizon + 0.25 * (base_y - horizon) - crest_y) * (t**0.8)) for t in np.linspace(0, 1, 20)]
    # The lip: an arc that leaves the crest forward and curls down toward the trough.
    centre = (crest_x - radius * 0.2, crest_y + radius)
    angles = np.linspace(-math.pi * 0.4, -math.pi * 1.15, 16)
    lip = [(centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)) for a in angles]
    tip = lip[-1]
    # Under the tip the falling curtain reaches the trough; the tube is inside the body.
    body = back[::-1] + lip + [(tip[0], base_y), (tip[0] - radius * 0.9, base_y + height * 0.04), (tip[0] - radius * 0.9, height), (width, height)]
    water_hi = _jitter(rng, (60, 175, 170), 20)
    water_lo = _jitter(rng, (10, 60, 100), 12)
    pixels = _gradient(width, height, water_hi, water_lo, power=0.9)
    # Backlit water near the crest is greener and brighter; the tube is in shadow.
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    tube = np.exp(-(((xs - centre[0]) / (radius * 0.8)) ** 2 + ((ys - centre[1] - radius * 0.35) / (radius * 1.0)) ** 2))
    pixels = pixels * (1 - 0.6 * tube[:, :, None]) + _texture(rng, width, height, 10.0)
    streak = np.sin((xs * 0.02 + ys * 0.09) + 3 * _smooth_noise(rng, width, height, 6))[:, :, None] * 10
    _paste_array(image, pixels + streak, _polygon_mask((width, height), body))
    # The thick lip itself: a band between the outer arc and a smaller inner arc.
    inner = [(centre[0] + radius * 0.68 * math.cos(a), centre[1] + radius * 0.68 * math.sin(a) - radius * 0.05) for a in angles]
    lip_colour = _mix(water_hi, (230, 255, 240), 0.25)
    image = _overlay(image, lambda d: d.polygon(lip + inner[::-1], fill=lip_colour + (200,)), blur=2)

    def foam(d: ImageDraw.ImageDraw) -> None:
        # Foam along the lip, thickest at the curl, then spray and white water below.
        for i, (x, y) in enumerate(lip):
            w = radius * (0.06 + 0.16 * i / len(lip))
            for _ in range(6):
                ox, oy, r = rng.normal(0, w * 0.5), rng.normal(0, w * 0.5), w * rng.uniform(0.4, 1.0)
                d.ellipse((x + ox - r, y + oy - r, x + ox + r, y + oy + r), fill=(250, 252, 255, int(rng.integers(150, 240))))
        for x, y in back[:8]:
            r = radius * 0.07
            d.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=(245, 250, 255, 150))
        for _ in range(160):  # the falling curtain of spray under the tip
            x = tip[0] + rng.normal(0, radius * 0.18)
            y = rng.uniform(tip[1], base_y)
            r = rng.uniform(1.5, 5)
            d.ellipse((x - r, y - r * 2, x + r, y + r * 2), fill=(255, 255, 255, int(rng.integers(90, 200))))

    image = _overlay(image, foam, blur=1.5)

    def white_water(d: ImageDraw.ImageDraw) -> None:
        edge = [(x, base_y - height * 0.02 + math.sin(x * 0.05) * height * 0.01 + rng.normal(0, height * 0.006)) for x in np.linspace(0, width, 60)]
        d.polygon(edge + [(width, base_y + height * 0.05), (0, base_y + height * 0.05)], fill=(245, 250, 255, 170))
        for _ in range(90):  # foam streaks drifting on the water in front
            x, y = rng.uniform(-0.1, 1.0) * width, base_y + rng.uniform(0.0, 0.2) * height
            length = rng.uniform(0.05, 0.2) * width
            d.line((x, y, x + length, y + rng.normal(0, 2)), fill=(240, 248, 255, int(rng.integers(60, 160))), width=int(rng.integers(1, 4)))

    image = _overlay(image, white_water, blur=2.0)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


_DRAWERS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "coast": _draw_coast,
    "island": _draw_island,
    "sand_beach": _draw_sand_beach,
    "coral_reef": _draw_coral_reef,
    "deep": _draw_deep,
    "ocean_wave": _draw_ocean_wave,
}
assert tuple(_DRAWERS) == CLASS_NAMES, "one drawer per class, in class order"


def draw_scene(class_name: str, rng: np.random.Generator, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Draw one RGB scene of `class_name` at `size` (width, height) from `rng` alone."""
    if class_name not in _DRAWERS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")
    width, height = size
    big = _DRAWERS[class_name](rng, width * SUPERSAMPLE, height * SUPERSAMPLE)
    image = big.resize((width, height), Image.LANCZOS)
    # Light sensor-like grain so no two flat regions are identical between images.
    grain = rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")
