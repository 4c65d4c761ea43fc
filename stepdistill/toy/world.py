"""The toy world: a procedural text-to-image distribution with a closed vocabulary.

Every image shows one shape (circle, square, triangle, cross) of one colour and one size class, at a continuous
position, scale, rotation and hue jitter, on a plain background. Its prompt is generated from the discrete
attributes, e.g. ``"a small red triangle on a gray background"``, so one prompt has a whole distribution of
images. Sampling is deterministic given a seed and unlimited in size. Images are float arrays in [-1, 1],
channels first, antialiased by 4x supersampling.
"""

from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, float] = {  # name -> hue in degrees
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 125.0,
    "blue": 225.0,
    "purple": 285.0,
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.06),
    "white": (0.94, 0.94, 0.94),
    "gray": (0.5, 0.5, 0.5),
}
SIZES: dict[str, tuple[float, float]] = {  # name -> range of the radius as a fraction of the image side
    "small": (0.17, 0.24),
    "large": (0.30, 0.40),
}
HUE_JITTER_DEG = 8.0
DISCRETE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
}
CONTINUOUS_ATTRIBUTES: tuple[str, ...] = ("x", "y", "radius")
VOCABULARY: tuple[str, ...] = tuple(
    sorted({"a", "on", "background", *SHAPES, *COLORS, *SIZES, *BACKGROUNDS})
)


@dataclass(frozen=True)
class Attributes:
    """The attributes of a batch of N images: discrete ones as integer indices, continuous ones as floats.

    ``x``, ``y`` are the shape's centre and ``radius`` its circumradius, all as fractions of the image side;
    ``rotation`` is in radians and ``hue_shift`` in degrees.
    """

    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    background: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    rotation: np.ndarray
    hue_shift: np.ndarray

    def __len__(self) -> int:
        return len(self.shape)

    def prompts(self) -> list[str]:
        return [
            make_prompt(SHAPES[s], tuple(COLORS)[c], tuple(SIZES)[z], tuple(BACKGROUNDS)[b])
            for s, c, z, b in zip(self.shape, self.color, self.size, self.background)
        ]

    def discrete(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in DISCRETE_ATTRIBUTES}

    def continuous(self) -> np.ndarray:
        """(N, 3) array of x, y, radius."""
        return np.stack([self.x, self.y, self.radius], axis=1).astype(np.float32)


def make_prompt(shape: str, color: str, size: str, background: str) -> str:
    return f"a {size} {color} {shape} on a {background} background"


def words_outside_vocabulary(prompt: str) -> list[str]:
    """The words of ``prompt`` (lower-cased, split on whitespace) that are not in :data:`VOCABULARY`, in order and
    without repeats: the toy tokenizer knows only the vocabulary and splits any other word into characters."""
    out: list[str] = []
    for word in prompt.lower().split():
        if word not in VOCABULARY and word not in out:
            out.append(word)
    return out


def parse_prompt(prompt: str) -> dict[str, int]:
    """Discrete attribute indices named by a toy prompt; raises ValueError for a prompt outside the world."""
    words = prompt.lower().split()
    out: dict[str, int] = {}
    for name, values in DISCRETE_ATTRIBUTES.items():
        candidates = list(words)
        if name == "color":  # the background colour is the word before "background"
            candidates = [w for i, w in enumerate(words) if not (i + 1 < len(words) and words[i + 1] == "background")]
        if name == "background":
            candidates = [w for i, w in enumerate(words) if i + 1 < len(words) and words[i + 1] == "background"]
        hits = [values.index(w) for w in candidates if w in values]
        if len(hits) != 1:
            raise ValueError(
                f"prompt {prompt!r} is not a toy-world prompt: expected exactly one {name} out of {list(values)}; "
                f"toy prompts look like {make_prompt('circle', 'red', 'small', 'gray')!r}"
            )
        out[name] = hits[0]
    return out


def all_prompts() -> list[str]:
    """Every prompt of the world (4 shapes x 6 colours x 2 sizes x 3 backgrounds = 144), in a fixed order."""
    return [make_prompt(s, c, z, b) for s, c, z, b in itertools.product(SHAPES, COLORS, SIZES, BACKGROUNDS)]


def sample_attributes(rng: np.random.Generator, n: int, prompts: list[str] | None = None) -> Attributes:
    """Draw N attribute sets: discrete ones uniformly (or fixed by ``prompts``), continuous ones uniformly."""
    if prompts is not None:
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for n={n}")
        parsed = [parse_prompt(p) for p in prompts]
        discrete = {k: np.array([p[k] for p in parsed], dtype=np.int64) for k in DISCRETE_ATTRIBUTES}
    else:
        discrete = {k: rng.integers(0, len(v), size=n) for k, v in DISCRETE_ATTRIBUTES.items()}
    lo = np.array([SIZES[s][0] for s in SIZES])[discrete["size"]]
    hi = np.array([SIZES[s][1] for s in SIZES])[discrete["size"]]
    radius = lo + (hi - lo) * rng.random(n)
    margin = radius * 0.9
    x = margin + (1 - 2 * margin) * rng.random(n)
    y = margin + (1 - 2 * margin) * rng.random(n)
    rotation = rng.random(n) * 2 * np.pi
    hue_shift = rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG, size=n)
    return Attributes(x=x, y=y, radius=radius, rotation=rotation, hue_shift=hue_shift, **discrete)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) (shape-centred, rotated frame) in a shape of circumradius r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        half = r / np.sqrt(2.0)
        return np.maximum(np.abs(u), np.abs(v)) <= half
    if shape == "triangle":  # equilateral, inradius r/2
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = -np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
        return inside
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def shape_rgb(attrs: Attributes) -> np.ndarray:
    """(N, 3) RGB in [0, 1] of each shape: the colour's hue plus jitter, full saturation and value."""
    hues = np.array(list(COLORS.values()))[attrs.color] + attrs.hue_shift
    return np.array([colorsys.hsv_to_rgb((h % 360) / 360.0, 0.9, 0.95) for h in hues], dtype=np.float32).reshape(-1, 3)


def render(attrs: Attributes, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render a batch of attribute sets to (N, 3, H, W) float32 images in [-1, 1]."""
    n = len(attrs)
    s = resolution * supersample
    coords = (np.arange(s) + 0.5) / s
    gx, gy = np.meshgrid(coords, coords, indexing="xy")
    images = np.empty((n, 3, resolution, resolution), dtype=np.float32)
    fg = shape_rgb(attrs)
    bg = np.array(list(BACKGROUNDS.values()), dtype=np.float32)[attrs.background]
    for i in range(n):
        dx, dy = gx - attrs.x[i], gy - attrs.y[i]
        c, sn = np.cos(attrs.rotation[i]), np.sin(attrs.rotation[i])
        u, v = c * dx + sn * dy, -sn * dx + c * dy
        mask = _inside(SHAPES[attrs.shape[i]], u, v, np.float64(attrs.radius[i])).astype(np.float32)
        cover = mask.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))
        images[i] = bg[i][:, None, None] * (1 - cover) + fg[i][:, None, None] * cover
    return images * 2.0 - 1.0


def sample(seed: int, n: int, resolution: int = 32, prompts: list[str] | None = None) -> tuple[np.ndarray, Attributes]:
    """N images and their attributes, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, n, prompts)
    return render(attrs, resolution), attrs
