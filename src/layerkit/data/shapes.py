"""The shapes world: procedural, seed-deterministic layered videos with known ground truth.

Every sample is a background layer (a periodic texture that may translate, wrapping around
seamlessly) and 1..3 coloured sprites (circle, square, triangle, cross) moving in straight
lines or standing still.  Everything is rendered analytically from signed distance functions
with soft (``softness`` px) edges, so a 16x32x32 clip takes a few milliseconds on a CPU.

Tensor letters: N layers (0 = background, 1.. = sprites back to front), F frames, C channels,
H height, W width, P tracked points.  Pixel (row i, column j) sits at ``(x, y) = (j, i)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from layerkit.errors import LayerkitError, ShapeError

__all__ = [
    "BACKGROUNDS", "BACKGROUND_COLOURS", "COLOURS", "DIRECTIONS", "SHAPES", "SPLITS",
    "ShapesConfig", "ShapesDataset", "collate_layered", "direction_vector",
    "make_sample", "render_shape", "seed_for", "shape_area", "shape_sdf",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
#: background palettes draw two distinct colours from this set (sprite colours plus white, black)
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {**COLOURS, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
BACKGROUNDS: tuple[str, ...] = ("stripes", "gradient", "checker", "dots")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_MOVING = DIRECTIONS[:4]
_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}
# area of each shape in units of size**2, and its largest extent from the centre in units of size
_AREA = {"circle": math.pi / 4, "square": 0.84**2, "triangle": 3 * math.sqrt(3) / 4 * 0.6**2, "cross": 5 / 9}
_EXTENT = {"circle": 0.5, "square": 0.42 * math.sqrt(2), "triangle": 0.6, "cross": 0.5}
_SKETCH_WIDTH = 1.0  # px half-width of sketch lines
_PLACEMENT_TRIES = 8


@dataclass(frozen=True)
class ShapesConfig:
    """How shapes-world clips are drawn.

    ``speed`` is a px/frame range, ``sprite_size`` a fraction of ``min(height, width)``,
    ``softness`` the width in px of the alpha ramp at edges (0 gives hard edges) and
    ``num_points`` the number P of tracked points per layer.
    """

    num_frames: int = 16
    height: int = 32
    width: int = 32
    num_sprites: int = 1
    static_prob: float = 0.25
    background_static_prob: float = 0.5
    speed: tuple[float, float] = (0.5, 1.5)
    sprite_size: tuple[float, float] = (0.3, 0.45)
    softness: float = 1.0
    num_points: int = 4

    def validate(self) -> None:
        """Raise ``LayerkitError`` naming the first out-of-range field."""
        checks = [
            (self.num_frames >= 1, "num_frames must be at least 1"),
            (self.height >= 8 and self.width >= 8, "height and width must be at least 8"),
            (1 <= self.num_sprites <= 3, "num_sprites must be between 1 and 3"),
            (0.0 <= self.static_prob <= 1.0, "static_prob must lie in [0, 1]"),
            (0.0 <= self.background_static_prob <= 1.0, "background_static_prob must lie in [0, 1]"),
            (0.0 < self.speed[0] <= self.speed[1], "speed must be a range (low, high) with 0 < low <= high"),
            (0.0 < self.sprite_size[0] <= self.sprite_size[1] <= 0.9,
             "sprite_size must be a range (low, high) with 0 < low <= high <= 0.9"),
            (self.softness >= 0.0, "softness must not be negative"),
            (self.num_points >= 1, "num_points must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise LayerkitError(f"ShapesConfig: {message} (got {self}).")


def direction_vector(direction: str) -> tuple[float, float]:
    """Unit (dx, dy) of a direction word; ``"still"`` gives (0, 0)."""
    if direction not in _VECTORS:
        raise LayerkitError(f"unknown direction '{direction}'; expected one of {DIRECTIONS}.")
    return _VECTORS[direction]


def shape_area(shape: str, size: float) -> float:
    """Area in px² of ``shape`` drawn at ``size`` px."""
    return _AREA[_check_shape(shape)] * size * size


def _check_shape(shape: str) -> str:
    if shape not in _AREA:
        raise LayerkitError(f"unknown shape '{shape}'; expected one of {SHAPES}.")
    return shape


def _box(dx: torch.Tensor, dy: torch.Tensor, hx: Any, hy: Any) -> torch.Tensor:
    qx, qy = dx.abs() - hx, dy.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def shape_sdf(shape: str, dx: torch.Tensor, dy: torch.Tensor, size: Any) -> torch.Tensor:
    """Signed distance (px, negative inside) of ``shape`` of ``size`` px at offsets (dx, dy) from its centre.

    The centre is the shape's centroid; ``size`` broadcasts against ``dx``/``dy``.
    """
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - 0.5 * size
    if shape == "square":
        return _box(dx, dy, 0.42 * size, 0.42 * size)
    if shape == "triangle":  # equilateral, pointing up, circumradius 0.6 * size
        s3 = math.sqrt(3) / 2
        planes = torch.maximum(torch.maximum(dy, -s3 * dx - 0.5 * dy), s3 * dx - 0.5 * dy)
        return planes - 0.3 * size
    if shape == "cross":
        return torch.minimum(_box(dx, dy, 0.5 * size, size / 6), _box(dx, dy, size / 6, 0.5 * size))
    raise LayerkitError(f"unknown shape '{shape}'; expected one of {SHAPES}.")


def _soft(sdf: torch.Tensor, softness: float) -> torch.Tensor:
    if softness <= 0:
        return (sdf <= 0).to(torch.float32)
    return (0.5 - sdf / softness).clamp(0.0, 1.0)


def render_shape(shape: str, cx: Any, cy: Any, size: Any, height: int, width: int,
                 softness: float = 1.0) -> torch.Tensor:
    """Soft alpha [F, H, W] of ``shape`` centred at (cx, cy) (floats or [F] tensors) with ``size`` px."""
    cx, cy, size = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (cx, cy, size))
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    return _soft(shape_sdf(_check_shape(shape), xs - cx, ys - cy, size), softness)


def _square_wave(coord: torch.Tensor, period: float, scale: float = 1.0) -> torch.Tensor:
    """Signed px distance to the nearest edge of a period-``period`` square wave (positive on band A)."""
    w = torch.frac(coord / period)
    return ((w - 0.5).abs() - 0.25) * period * scale


def _texture(kind: str, u: torch.Tensor, v: torch.Tensor, period: float, flip: float,
             softness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix weight of colour A and texture-edge sketch, both [F, H, W], at texture coordinates (u, v)."""
    if kind == "stripes":
        g = _square_wave(u + flip * v, period, 1 / math.sqrt(2))
        return _soft(-g, softness), (1 - g.abs() / _SKETCH_WIDTH).clamp(0, 1)
    if kind == "checker":
        gx, gy = _square_wave(u, period), _square_wave(v, period)
        mx, my = _soft(-gx, softness), _soft(-gy, softness)
        edge = (1 - torch.minimum(gx.abs(), gy.abs()) / _SKETCH_WIDTH).clamp(0, 1)
        return mx * my + (1 - mx) * (1 - my), edge
    if kind == "dots":
        dx = (torch.frac(u / period + 0.5) - 0.5) * period
        dy = (torch.frac(v / period + 0.5) - 0.5) * period
        d = torch.sqrt(dx * dx + dy * dy) - 0.3 * period
        return _soft(d, softness), (1 - d.abs() / _SKETCH_WIDTH).clamp(0, 1)
    if kind == "gradient":  # smooth diagonal waves; the sketch marks their crests and troughs
        coord = u + flip * v
        mix = 0.5 - 0.5 * torch.cos(coord * (2 * math.pi / (2 * period)))
        w = coord / period
        dist = (w - torch.round(w)).abs() * period / math.sqrt(2)
        return mix, (1 - dist / _SKETCH_WIDTH).clamp(0, 1)
    raise LayerkitError(f"unknown background kind '{kind}'; expected one of {BACKGROUNDS}.")


def _texture_period(height: int, width: int, rng: random.Random) -> int:
    """A period dividing both frame sides when possible, so the texture also wraps on the frame torus."""
    g = math.gcd(height, width)
    divisors = [d for d in range(6, min(height, width) // 2 + 1) if g % d == 0]
    return rng.choice(divisors) if divisors else max(4, min(height, width) // 4)


def _place(rng: random.Random, length: int, extent: float, travel: float) -> tuple[float, float]:
    """Start coordinate and (possibly shortened) travel along one axis.

    Keeps the centre at least ``extent`` from the edges when the path allows, and never closer
    than ``0.35 * extent`` (so >= ~75% of the sprite stays visible); a travel that cannot fit is shortened.
    """
    span = float(length - 1)
    low_margin = min(0.35 * extent, span / 2)
    travel = min(travel, span - 2 * low_margin)
    margin = min(extent, (span - travel) / 2)
    return rng.uniform(margin, span - margin - travel), travel


def _mean_distance(p: tuple[float, float], v: tuple[float, float], q: tuple[float, float],
                   w: tuple[float, float], frames: int) -> float:
    """Mean over frames of the distance between two linearly moving centres."""
    total = 0.0
    for t in range(frames):
        total += math.hypot(p[0] + v[0] * t - q[0] - w[0] * t, p[1] + v[1] * t - q[1] - w[1] * t)
    return total / frames


def seed_for(split: str, seed: int, index: int) -> int:
    """Seed of item ``index`` of a ``split`` dataset built with ``seed``; splits use disjoint seed ranges."""
    if split not in SPLITS:
        raise LayerkitError(f"unknown split '{split}'; expected one of {SPLITS}.")
    if not (0 <= seed < 2**24 and 0 <= index < 2**24):
        raise LayerkitError(f"dataset seed and index must lie in [0, 2**24); got seed {seed}, index {index}.")
    return (SPLITS.index(split) << 48) | (seed << 24) | index


def held_out_seed(split: str, seed: int, index: int) -> int:
    """``seed_for`` of a held-out split, as a user names it (``inputs.split``): ``test`` (what
    records report) or ``val`` (for choosing settings without looking at the test clips)."""
    if split not in ("val", "test"):
        raise LayerkitError(f"inputs.split must be val or test (held-out clips); got '{split}'.")
    return seed_for(split, seed, index)


def _sample_params(rng: random.Random, cfg: ShapesConfig) -> dict[str, Any]:
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    steps = max(F - 1, 1)
    kind = rng.choice(BACKGROUNDS)
    palette = rng.sample(sorted(BACKGROUND_COLOURS), 2)
    bg_dir = "still" if rng.random() < cfg.background_static_prob else rng.choice(_MOVING)
    bg_speed = rng.uniform(*cfg.speed) if bg_dir != "still" else 0.0
    background = {"kind": kind, "colours": palette, "direction": bg_dir, "speed": bg_speed,
                  "period": _texture_period(H, W, rng), "flip": rng.choice((1.0, -1.0))}
    free = [c for c in COLOURS if c not in palette]
    colours = rng.sample(free, cfg.num_sprites)
    sprites = []
    for colour in colours:
        shape = rng.choice(SHAPES)
        size = rng.uniform(*cfg.sprite_size) * min(H, W)
        direction = "still" if rng.random() < cfg.static_prob else rng.choice(_MOVING)
        speed = rng.uniform(*cfg.speed) if direction != "still" else 0.0
        vx, vy = direction_vector(direction)
        extent = _EXTENT[shape] * size + cfg.softness
        for _ in range(_PLACEMENT_TRIES):  # re-place a sprite that would hide most of the clip behind/over another
            x0, tx = _place(rng, W, extent, abs(vx) * speed * steps)
            y0, ty = _place(rng, H, extent, abs(vy) * speed * steps)
            x0, y0 = (x0 + tx if vx < 0 else x0), (y0 + ty if vy < 0 else y0)  # start at the far end when moving back
            sx, sy = vx * (tx + ty) / steps, vy * (tx + ty) / steps
            if all(_mean_distance((x0, y0), (sx, sy), other["start"], other["velocity"], F)
                   >= 0.4 * (size + other["size"]) for other in sprites):
                break
        if direction != "still":
            speed = (tx + ty) / steps
        sprites.append({"shape": shape, "colour": colour, "direction": direction, "size": size,
                        "speed": speed, "start": (x0, y0), "velocity": (vx * speed, vy * speed)})
    return {"background": background, "sprites": sprites}


def _visibility(points: torch.Tensor, occluder: torch.Tensor | None, H: int, W: int) -> torch.Tensor:
    """[F, P] 1 where a point (points [F, P, 2]) lies in frame and no layer in front covers it."""
    x, y = points[..., 0], points[..., 1]
    vis = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    if occluder is not None:
        xi = x.round().clamp(0, W - 1).long()
        yi = y.round().clamp(0, H - 1).long()
        frames = torch.arange(points.shape[0]).view(-1, 1)
        vis &= occluder[frames, yi, xi] < 0.5
    return vis.to(torch.float32)


def _sprite_offsets(num_points: int, size: float) -> torch.Tensor:
    """[P, 2] offsets of tracked points from a sprite's centre; all lie inside every vocabulary shape."""
    offsets = [(0.0, 0.0)]
    for k in range(1, num_points):
        radius = (0.15 if k <= 8 else 0.075) * size
        angle = (k - 1) * math.pi / 4 + (0.0 if k <= 8 else math.pi / 8)
        offsets.append((radius * math.cos(angle), radius * math.sin(angle)))
    return torch.tensor(offsets, dtype=torch.float32)


def make_sample(seed: int, config: ShapesConfig | None = None) -> dict[str, Any]:
    """Render the layered clip of ``seed``.  N = 1 + num_sprites layers, layer 0 the background.

    Returns float32 tensors (images in [0, 1]): ``layers_rgb`` [N, F, 3, H, W], ``layers_alpha``
    [N, F, 1, H, W], ``blended`` [F, 3, H, W], ``foreground_rgb`` [F, 3, H, W] (0.5 where alpha is 0),
    ``foreground_alpha`` [F, 1, H, W], ``background`` [F, 3, H, W], ``layer_masks`` [N, F, 1, H, W]
    ({0, 1}, a partition of the frame), ``motion_scores`` [N] (px/frame), ``trajectories``
    [N, F, P, 2] (x, y), ``trajectory_visibility`` [N, F, P], ``sketches`` [N, F, 1, H, W],
    ``static`` bool [N]; and ``prompts`` (list of N str), ``prompt``, ``foreground_prompt``,
    ``background_prompt``, ``meta`` (plain python) and ``seed``.
    """
    cfg = config if config is not None else ShapesConfig()
    cfg.validate()
    rng = random.Random(seed)
    params = _sample_params(rng, cfg)
    F, H, W, P, soft = cfg.num_frames, cfg.height, cfg.width, cfg.num_points, cfg.softness
    t = torch.arange(F, dtype=torch.float32)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)

    bg = params["background"]
    bvx, bvy = (c * bg["speed"] for c in direction_vector(bg["direction"]))
    u = xs - (bvx * t).view(F, 1, 1)
    v = ys - (bvy * t).view(F, 1, 1)
    mix, bg_sketch = _texture(bg["kind"], u, v, float(bg["period"]), bg["flip"], soft)
    col_a, col_b = (torch.tensor(BACKGROUND_COLOURS[c]).view(1, 3, 1, 1) for c in bg["colours"])
    mix = mix.unsqueeze(1)
    background = mix * col_a + (1 - mix) * col_b
    bg_start = []
    for _ in range(P):  # background points that stay in frame when the drift allows, else wrap around
        start = []
        for vel, side in ((bvx, W), (bvy, H)):
            travel = vel * max(F - 1, 0)
            low, high = max(0.0, -travel), min(side - 1.0, side - 1.0 - travel)
            start.append(rng.uniform(low, high) if low <= high else rng.uniform(0, side - 1.0))
        bg_start.append(start)
    bg_points = torch.tensor(bg_start).view(1, P, 2) + torch.stack([bvx * t, bvy * t], -1).view(F, 1, 2)
    bg_points = torch.stack([bg_points[..., 0].remainder(W), bg_points[..., 1].remainder(H)], -1)

    alphas, sketches, points, colours = [], [bg_sketch.unsqueeze(1)], [bg_points], []
    for sp in params["sprites"]:
        cx = sp["start"][0] + sp["velocity"][0] * t
        cy = sp["start"][1] + sp["velocity"][1] * t
        sdf = shape_sdf(sp["shape"], xs - cx.view(F, 1, 1), ys - cy.view(F, 1, 1), sp["size"])
        alphas.append(_soft(sdf, soft).unsqueeze(1))
        sketches.append((1 - sdf.abs() / _SKETCH_WIDTH).clamp(0, 1).unsqueeze(1))
        centre = torch.stack([cx, cy], -1).view(F, 1, 2)
        points.append(centre + _sprite_offsets(P, sp["size"]).view(1, P, 2))
        colours.append(torch.tensor(COLOURS[sp["colour"]]).view(1, 3, 1, 1))

    # back-to-front "over": blended frame, premultiplied foreground, visible masks
    blended, fg_premult, fg_alpha = background, torch.zeros(F, 3, H, W), torch.zeros(F, 1, H, W)
    for a, c in zip(alphas, colours):
        blended = c * a + blended * (1 - a)
        fg_premult = c * a + fg_premult * (1 - a)
        fg_alpha = a + fg_alpha * (1 - a)
    fg_rgb = torch.where(fg_alpha > 0, (fg_premult / fg_alpha.clamp(min=1e-12)).clamp(0, 1),
                         torch.full_like(fg_premult, 0.5))

    n = len(alphas) + 1
    masks: list[torch.Tensor] = [torch.zeros(0)] * n
    visibility: list[torch.Tensor] = [torch.zeros(0)] * n
    claimed = torch.zeros(F, 1, H, W, dtype=torch.bool)
    occluder: torch.Tensor | None = None
    for i in range(n - 1, -1, -1):  # front to back
        visibility[i] = _visibility(points[i], occluder, H, W)
        if i == 0:
            masks[0] = (~claimed).to(torch.float32)
            break
        a = alphas[i - 1]
        masks[i] = ((a >= 0.5) & ~claimed).to(torch.float32)
        claimed |= a >= 0.5
        occluder = a[:, 0] if occluder is None else 1 - (1 - occluder) * (1 - a[:, 0])

    bg_phrase = f"{bg['colours'][0]} and {bg['colours'][1]} {bg['kind']}"
    bg_prompt = f"{bg_phrase} drifting {bg['direction']}" if bg["direction"] != "still" else f"{bg_phrase}, still"
    sprite_prompts = [f"a {sp['colour']} {sp['shape']} " + (f"moving {sp['direction']}" if sp["direction"] != "still"
                                                             else "standing still") for sp in params["sprites"]]
    fg_prompt = " and ".join(sprite_prompts)
    speeds = [bg["speed"]] + [sp["speed"] for sp in params["sprites"]]
    meta = {
        "num_frames": F, "height": H, "width": W,
        "background": {k: (list(v) if isinstance(v, list) else v) for k, v in bg.items()},
        "sprites": [{**sp, "start": tuple(sp["start"]), "velocity": tuple(sp["velocity"])} for sp in params["sprites"]],
    }
    return {
        "layers_rgb": torch.stack([background] + [c.expand(F, 3, H, W) for c in colours]),
        "layers_alpha": torch.stack([torch.ones(F, 1, H, W)] + alphas),
        "blended": blended,
        "foreground_rgb": fg_rgb,
        "foreground_alpha": fg_alpha,
        "background": background,
        "layer_masks": torch.stack(masks),
        "motion_scores": torch.tensor(speeds, dtype=torch.float32),
        "trajectories": torch.stack(points),
        "trajectory_visibility": torch.stack(visibility),
        "sketches": torch.stack(sketches),
        "prompts": [bg_prompt] + sprite_prompts,
        "prompt": f"{fg_prompt} over {bg_prompt}",
        "foreground_prompt": fg_prompt,
        "background_prompt": bg_prompt,
        "static": torch.tensor([s == 0.0 for s in speeds], dtype=torch.bool),
        "meta": meta,
        "seed": seed,
    }


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` shapes-world samples; item i is ``make_sample(seed_for(split, seed, i), config)``.

    The train, val and test splits draw from disjoint seed ranges, so held-out splits never repeat
    a training clip.  Items are rendered on demand (deterministically).
    """

    cacheable = True  # item i is the same every epoch (train.cache_latents may keep its latents)

    def __init__(self, size: int, seed: int = 0, config: ShapesConfig | None = None, split: str = "train") -> None:
        if size < 0:
            raise LayerkitError(f"ShapesDataset size must not be negative; got {size}.")
        seed_for(split, seed, 0)  # validates split and seed
        if size > 2**24:
            raise LayerkitError(f"ShapesDataset size must be at most 2**24; got {size}.")
        self.size, self.seed, self.split = size, seed, split
        self.config = config if config is not None else ShapesConfig()
        self.config.validate()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesDataset index {index} out of range for size {self.size}.")
        return make_sample(seed_for(self.split, self.seed, index), self.config)


def collate_layered(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples: tensors gain a leading B; ``prompts`` becomes list[list[str]],
    other strings list[str], ``meta`` a list of dicts and ``seed`` an int64 tensor [B]."""
    if not batch:
        raise LayerkitError("collate_layered got an empty batch.")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ShapeError(f"collate_layered: '{key}' has differing shapes {sorted(shapes)} in one batch.")
            out[key] = torch.stack(values)
        elif key == "seed":
            out[key] = torch.tensor(values, dtype=torch.int64)
        elif key == "prompts":
            out[key] = [list(v) for v in values]
        else:
            out[key] = values
    return out
