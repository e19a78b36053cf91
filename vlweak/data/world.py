"""The built-in procedurally generated image world ("shapes world").

Small RGB images of coloured shapes with a caption each, drawn deterministically from
``(seed, split, index)``, so any item can be produced alone, in any order, on any worker or rank.
It carries the structure vlweak's methods exploit:

* **single-label**: one object per image; the label is its shape (12 classes), its colour, or both;
* **hierarchy**: the shapes group into three coarse classes whose names never appear in any
  caption ("polygon", "curved shape", "symbol"), so classifying through the sub-class names beats
  classifying through the coarse names (the gap CHiLS closes);
* **multi-label** scenes: 1-4 small objects, labels = the shapes present;
* **domain shift** (``shift`` in [0, 1]): textured and pale backgrounds, desaturated palette and
  outline-only drawing appear as ``shift`` grows, giving an unlabeled target domain that
  zero-shot handles worse than the source domain (its images' nearest neighbours share their shape
  less often, too: ``benchmarks/world_zeroshot.py`` measures both);
* **caption noise** (``misnaming``, pretraining data only): captions of shifted-domain images call
  some shapes by a look-alike's name (an ellipse "a circle"), as web captions of an unusual domain
  do; a model pretrained on them has a zero-shot classifier biased on that domain while its image
  features still tell the shapes apart, the situation pseudolabelling and propagation correct.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

SHAPE_HIERARCHY: dict[str, list[str]] = {
    "polygon": ["triangle", "square", "pentagon", "hexagon"],
    "curved shape": ["circle", "ellipse", "crescent", "heart"],
    "symbol": ["star", "cross", "arrow", "ring"],
}
SHAPES: list[str] = [s for children in SHAPE_HIERARCHY.values() for s in children]
COARSE: list[str] = list(SHAPE_HIERARCHY)
PARENT: dict[str, str] = {s: p for p, children in SHAPE_HIERARCHY.items() for s in children}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOUR_NAMES: list[str] = list(COLOURS)
Task = Literal["shape", "coarse", "colour", "colour_shape"]
TASKS = get_args(Task)
MISNAMING: dict[str, str] = {"ellipse": "circle", "arrow": "triangle", "square": "pentagon"}
"""The look-alike names of the noisy-caption world (``recipes/pretrain/shapes_noisy.yaml``)."""
SPLITS = {"train": 0, "val": 1, "test": 2, "unlabeled": 3, "pretrain": 4}


def split_id(split: str) -> int:
    """The number of a world split; an unknown split is a ``ValueError`` listing the valid ones."""
    try:
        return SPLITS[split]
    except (KeyError, TypeError):
        raise ValueError(f"the shapes world has no {split!r} split (splits: {', '.join(SPLITS)})") from None


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or a 2n-pointed star when ``inner`` is given), radius 1."""
    if inner is None:
        ang = -math.pi / 2 + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    ang = -math.pi / 2 + math.pi * np.arange(2 * n) / n
    rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _regular(3) * 1.05 + np.array([0, 0.18]),
    "square": _regular(4) * 1.0,
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _regular(5, inner=0.42),
    "cross": np.array(
        [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]
    ),
    "arrow": np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.25], [-1, 0.25]]),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test on coordinate grids."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in unit local coordinates (radius 1, y pointing down)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.8**2)
    if shape == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise KeyError(f"unknown shape {shape!r}; known: {SHAPES}")


@dataclass
class WorldObject:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float
    outline: bool = False

    @property
    def size_word(self) -> str:
        return "large" if self.radius >= 15 else "small"


@dataclass
class Scene:
    objects: list[WorldObject]
    background: str
    image: np.ndarray = field(repr=False)  # uint8 [H, W, 3]
    caption: str = ""


_BACKGROUNDS_SOURCE = ("dark", "noisy", "gray")
_BACKGROUNDS_TARGET = ("striped", "checkered", "pale")


def _position_word(cx: float, cy: float, size: int) -> str:
    col = ["left", "", "right"][min(2, int(3 * cx / size))]
    row = ["top", "", "bottom"][min(2, int(3 * cy / size))]
    return " ".join(w for w in (row, col) if w) or "centre"


class ShapesWorld:
    """Deterministic generator of shapes-world scenes.

    Args:
        seed: world seed; ``(seed, split, index)`` fixes an item completely.
        image_size: side of the square RGB images.
        shift: domain shift in [0, 1] (0 = source domain, 1 = fully shifted target domain).
        multilabel: draw 1..``max_objects`` small objects per image instead of one.
        max_objects: most objects in a multi-label scene.
        misnaming: ``{shape: name}``: captions of shifted-domain images (those on a shifted
            background) call ``shape`` by ``name``, another shape, with probability
            ``misnaming_rate``. Only captions change: images and labels are the same draw.
        misnaming_rate: how often a shifted-domain caption uses the wrong name, in [0, 1].
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        shift: float = 0.0,
        multilabel: bool = False,
        max_objects: int = 4,
        misnaming: dict[str, str] | None = None,
        misnaming_rate: float = 0.0,
    ) -> None:
        if not 0.0 <= shift <= 1.0:
            raise ValueError(f"shift must lie in [0, 1], got {shift}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the smallest the world draws its shapes at), got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        if not 0.0 <= misnaming_rate <= 1.0:
            raise ValueError(f"misnaming_rate must lie in [0, 1], got {misnaming_rate}")
        unknown = sorted({s for pair in (misnaming or {}).items() for s in pair} - set(SHAPES))
        if unknown:
            raise ValueError(f"misnaming names shapes the world does not have: {unknown} (shapes: {SHAPES})")
        same = sorted(s for s, name in (misnaming or {}).items() if s == name)
        if same:
            raise ValueError(f"misnaming maps a shape to its own name: {same}")
        self.seed, self.image_size, self.shift = seed, image_size, shift
        self.multilabel, self.max_objects = multilabel, max_objects
        self.misnaming = dict(misnaming or {}) if misnaming_rate > 0 else {}
        self.misnaming_rate = misnaming_rate if self.misnaming else 0.0
        g = np.arange(image_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(g, g, indexing="ij")

    def rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, split_id(split), index, int(self.shift * 1000), int(self.multilabel)])

    # ---------------------------------------------------------------- drawing
    def _background(self, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        s = self.image_size
        target = rng.random() < self.shift
        kind = rng.choice(_BACKGROUNDS_TARGET if target else _BACKGROUNDS_SOURCE)
        if kind == "dark":
            img = np.full((s, s, 3), rng.uniform(0, 60), np.float32) + rng.normal(0, 6, (s, s, 3))
        elif kind == "noisy":
            img = np.full((s, s, 3), rng.uniform(20, 90), np.float32) + rng.normal(0, 30, (s, s, 3))
        elif kind == "gray":
            img = np.full((s, s, 3), rng.uniform(90, 140), np.float32) + rng.normal(0, 5, (s, s, 3))
        elif kind == "striped":
            period, phase = rng.uniform(4, 10), rng.uniform(0, 2 * np.pi)
            a, b = rng.uniform(0, 80), rng.uniform(120, 200)
            ang = rng.uniform(0, np.pi)
            t = self._xx * np.cos(ang) + self._yy * np.sin(ang)
            wave = (np.sin(2 * np.pi * t / period + phase) > 0).astype(np.float32)
            img = (a + (b - a) * wave)[..., None].repeat(3, -1) + rng.normal(0, 8, (s, s, 3))
        elif kind == "checkered":
            cell = rng.integers(4, 10)
            chk = ((self._xx // cell + self._yy // cell) % 2).astype(np.float32)
            a, b = rng.uniform(20, 90), rng.uniform(130, 210)
            img = (a + (b - a) * chk)[..., None].repeat(3, -1) + rng.normal(0, 8, (s, s, 3))
        else:  # pale
            img = np.full((s, s, 3), rng.uniform(190, 240), np.float32) + rng.normal(0, 10, (s, s, 3))
        tint = rng.normal(0, 10, 3) if target else np.zeros(3)
        return str(kind), img + tint

    def _colour_rgb(self, colour: str, rng: np.random.Generator) -> np.ndarray:
        rgb = np.array(COLOURS[colour], np.float32) + rng.normal(0, 12, 3)
        if rng.random() < self.shift:  # shifted palette: desaturated and darker
            gray = rgb.mean()
            rgb = 0.65 * rgb + 0.35 * gray
            rgb *= rng.uniform(0.6, 0.9)
        return rgb

    def _place(self, rng: np.random.Generator, n: int, rmin: float, rmax: float) -> list[tuple[float, float, float]]:
        s, out = self.image_size, []
        for _ in range(200):
            if len(out) == n:
                break
            r = rng.uniform(rmin, rmax)
            cx, cy = rng.uniform(r + 1, s - r - 1, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in out):
                out.append((cx, cy, r))
        return out

    def scene(self, split: str, index: int) -> Scene:
        rng = self.rng(split, index)
        background, img = self._background(rng)
        s = self.image_size
        if self.multilabel:
            n = int(rng.integers(1, self.max_objects + 1))
            spots = self._place(rng, n, 0.10 * s, 0.19 * s)
            shapes = rng.choice(len(SHAPES), size=len(spots), replace=False)
        else:
            spots = self._place(rng, 1, 0.17 * s, 0.36 * s)
            shapes = rng.integers(0, len(SHAPES), 1)
        objects = []
        for (cx, cy, r), k in zip(spots, shapes):
            obj = WorldObject(
                shape=SHAPES[int(k)],
                colour=COLOUR_NAMES[int(rng.integers(len(COLOURS)))],
                cx=float(cx),
                cy=float(cy),
                radius=float(r * 64 / s),
                angle=float(rng.uniform(-0.35, 0.35)),
                outline=bool(rng.random() < 0.5 * self.shift),
            )
            ca, sa = math.cos(obj.angle), math.sin(obj.angle)
            dx, dy = (self._xx - cx) / r, (self._yy - cy) / r
            u, v = ca * dx + sa * dy, -sa * dx + ca * dy
            mask = shape_mask(obj.shape, u, v)
            if obj.outline:
                inner = shape_mask(obj.shape, u / 0.72, v / 0.72)
                mask = mask & ~inner
            img[mask] = self._colour_rgb(obj.colour, rng) + rng.normal(0, 4, (int(mask.sum()), 3))
            objects.append(obj)
        image = np.clip(img, 0, 255).astype(np.uint8)
        scene = Scene(objects=objects, background=background, image=image)
        scene.caption = self.caption(scene, rng)
        return scene

    # ---------------------------------------------------------------- captions
    def shape_word(self, scene: Scene, obj: WorldObject, rng: np.random.Generator) -> str:
        """The word a caption uses for ``obj``'s shape: its name, or under ``misnaming`` (shifted
        domain only) sometimes a look-alike's. Draws from ``rng`` only for a misnamed shape, so a
        world without misnaming captions exactly as before."""
        name = self.misnaming.get(obj.shape)
        if name is None or scene.background not in _BACKGROUNDS_TARGET:
            return obj.shape
        return name if rng.random() < self.misnaming_rate else obj.shape

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        s = self.image_size
        if len(scene.objects) == 1:
            o = scene.objects[0]
            shape = self.shape_word(scene, o, rng)
            pos = _position_word(o.cx, o.cy, s)
            style = " outline of a" if o.outline else ""
            forms = [
                f"a {o.size_word} {o.colour} {shape} on a {scene.background} background",
                f"a photo of a {o.colour} {shape}.",
                f"a photo of a {shape}.",
                f"a {shape}",
                f"a {o.colour} {shape} in the {pos}",
                f"an image with a{style} {o.colour} {shape}",
                f"{o.colour} {shape}, {o.size_word}, {scene.background} background",
                f"a {o.colour} object",
            ]
            return _articles(forms[int(rng.integers(len(forms)))])
        words = [self.shape_word(scene, o, rng) for o in scene.objects]
        names = [f"{o.colour} {w}" if rng.random() < 0.5 else w for o, w in zip(scene.objects, words)]
        order = rng.permutation(len(names))
        names = [names[i] for i in order]
        listed = ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"
        forms = [f"a photo of {listed}.", f"{listed} on a {scene.background} background", listed]
        return _articles(forms[int(rng.integers(len(forms)))])


def _articles(text: str) -> str:
    """Fix "a" before a vowel ("a arrow" -> "an arrow")."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def classnames_for(task: str) -> list[str]:
    """Class vocabulary of a single-label task of the world."""
    if task == "shape":
        return list(SHAPES)
    if task == "coarse":
        return list(COARSE)
    if task == "colour":
        return list(COLOUR_NAMES)
    if task == "colour_shape":
        return [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    raise ValueError(f"unknown shapes-world task {task!r}; choose from {TASKS}")


def label_of(scene: Scene, task: str) -> int:
    o = scene.objects[0]
    if task == "shape":
        return SHAPES.index(o.shape)
    if task == "coarse":
        return COARSE.index(PARENT[o.shape])
    if task == "colour":
        return COLOUR_NAMES.index(o.colour)
    if task == "colour_shape":
        return COLOUR_NAMES.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    raise ValueError(f"unknown shapes-world task {task!r}; choose from {TASKS}")


def multilabel_target(scene: Scene) -> torch.Tensor:
    t = torch.zeros(len(SHAPES))
    for o in scene.objects:
        t[SHAPES.index(o.shape)] = 1.0
    return t


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())
