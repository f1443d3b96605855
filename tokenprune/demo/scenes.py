"""A seeded generator of synthetic scenes and single-word visual questions.

Scenes are 96x96 RGB: a noisy, cluttered background (dim, desaturated strokes and specks) and 2-5
saturated objects of 5 shapes, 6 colours and 2 sizes, placed without overlap and away from the
image's middle lines (so left/right and top/bottom are unambiguous). Answering needs the few patches
an object covers; the clutter makes content-blind pruning lose them. Everything derives from integer
seeds: `split_seed` separates train and evaluation, `sample(split, i)` is the i-th sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 96
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
RADII = {"small": (5.0, 6.0), "large": (8.5, 10.5)}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("colour", "shape", "count", "exists", "size", "horizontal", "vertical")
SPLIT_SEEDS = {"train": 0, "eval": 1_000_003}
SPLITS = tuple(SPLIT_SEEDS)


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour name, size name, centre and radius in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Question:
    """A question, its one-word answer, and its kind (one of `KINDS`)."""

    text: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """Objects plus the seed of the background noise and clutter."""

    objects: tuple[Obj, ...]
    seed: int

    def render(self) -> np.ndarray:
        """`[96, 96, 3]` uint8 RGB."""
        rng = np.random.default_rng(self.seed)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
        base = rng.uniform(60, 110)
        image = base + rng.normal(0, 10, (SIZE, SIZE, 1)) + rng.normal(0, 4, (SIZE, SIZE, 3))
        for _ in range(rng.integers(14, 26)):  # clutter: dim desaturated strokes
            x0, y0 = rng.uniform(0, SIZE, 2)
            angle, length = rng.uniform(0, np.pi), rng.uniform(3, 12)
            dx, dy = np.cos(angle), np.sin(angle)
            t = np.clip((xx - x0) * dx + (yy - y0) * dy, 0, length)
            dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
            grey = rng.uniform(30, 190)
            tint = rng.normal(0, 12, 3)
            image = np.where((dist < rng.uniform(0.6, 1.4))[..., None], grey + tint, image)
        for obj in self.objects:
            colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.normal(0, 8, 3)
            image = np.where(shape_mask(obj, xx, yy)[..., None], colour, image)
        return np.clip(image, 0, 255).astype(np.uint8)


def shape_mask(obj: Obj, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean `[H, W]` pixels covered by `obj`."""
    dx, dy, r = xx - obj.cx, yy - obj.cy, obj.r
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if obj.shape == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.62 * (dy + r))
    if obj.shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    raise ValueError(f"unknown shape {obj.shape!r}")


def make_scene(rng: np.random.Generator) -> Scene:
    """2-5 objects with distinct (shape, colour) pairs, no overlap, off the middle lines."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.permutation(len(pairs))[: rng.integers(2, 6)]
    objects: list[Obj] = []
    for index in chosen:
        shape, colour = pairs[index]
        for _ in range(200):
            size = ("small", "large")[rng.integers(2)]
            r = rng.uniform(*RADII[size])
            cx, cy = rng.uniform(r + 2, SIZE - r - 2, 2)
            if min(abs(cx - SIZE / 2), abs(cy - SIZE / 2)) < r + 3:
                continue
            if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 4 for o in objects):
                objects.append(Obj(shape, colour, size, float(cx), float(cy), float(r)))
                break
    return Scene(objects=tuple(objects), seed=int(rng.integers(2**31)))


def make_question(scene: Scene, rng: np.random.Generator) -> Question:
    """A random valid question about `scene` (kinds drawn uniformly, retried until well-posed)."""
    objs = scene.objects
    while True:
        kind = KINDS[rng.integers(len(KINDS))]
        obj = objs[rng.integers(len(objs))]
        if kind == "colour" and sum(o.shape == obj.shape for o in objs) == 1:
            return Question(f"what colour is the {obj.shape} ?", obj.colour, kind)
        if kind == "shape" and sum(o.colour == obj.colour for o in objs) == 1:
            return Question(f"what shape is the {obj.colour} object ?", obj.shape, kind)
        if kind == "count":
            if rng.integers(2):
                shape = SHAPES[rng.integers(len(SHAPES))]
                return Question(f"how many {shape} are there ?", NUMBERS[sum(o.shape == shape for o in objs)], kind)
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            return Question(
                f"how many {colour} objects are there ?", NUMBERS[sum(o.colour == colour for o in objs)], kind
            )
        if kind == "exists":
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
            if rng.integers(2):
                shape, colour = obj.shape, obj.colour
            present = any(o.shape == shape and o.colour == colour for o in objs)
            return Question(f"is there a {colour} {shape} ?", "yes" if present else "no", kind)
        if kind == "size":
            return Question(f"what size is the {obj.colour} {obj.shape} ?", obj.size, kind)
        if kind == "horizontal":
            side = "left" if obj.cx < SIZE / 2 else "right"
            return Question(f"is the {obj.colour} {obj.shape} on the left or the right ?", side, kind)
        if kind == "vertical":
            side = "top" if obj.cy < SIZE / 2 else "bottom"
            return Question(f"is the {obj.colour} {obj.shape} at the top or the bottom ?", side, kind)


def sample(split: str, index: int) -> tuple[Scene, Question]:
    """The `index`-th (scene, question) of `split` ("train" or "eval"), fully determined by both."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    scene = make_scene(rng)
    return scene, make_question(scene, rng)


def vocabulary() -> list[str]:
    """Every word the prompts and answers use (the demo tokenizer's vocabulary)."""
    words = [
        "user",
        "assistant",
        ":",
        "?",
        "what",
        "colour",
        "is",
        "the",
        "shape",
        "object",
        "how",
        "many",
        "are",
        "there",
        "objects",
        "a",
        "size",
        "on",
        "left",
        "or",
        "right",
        "at",
        "top",
        "bottom",
        "yes",
        "no",
        "small",
        "large",
    ]
    return words + list(SHAPES) + list(COLOURS) + list(NUMBERS)


def presence_labels(scene: Scene) -> np.ndarray:
    """`[3 * len(SHAPES) * len(COLOURS)]` float32 multi-hot for the [CLS] pre-training objective.

    Three blocks over the (shape, colour) pairs: present anywhere; present in the right half;
    present in the bottom half. The position blocks make the encoder keep where things are.
    """
    pairs = len(SHAPES) * len(COLOURS)
    labels = np.zeros(3 * pairs, dtype=np.float32)
    for o in scene.objects:
        pair = SHAPES.index(o.shape) * len(COLOURS) + list(COLOURS).index(o.colour)
        labels[pair] = 1.0
        labels[pairs + pair] = float(o.cx >= SIZE / 2)
        labels[2 * pairs + pair] = float(o.cy >= SIZE / 2)
    return labels


def content_labels(scene: Scene) -> np.ndarray:
    """`[2 * len(SHAPES) * len(COLOURS)]` float32 multi-hot for the demo-qwen tower's mean-pooled objective.

    Two blocks over the (shape, colour) pairs: present; present and large. No position targets: a
    tower with only relative (rotary) positions has little to tell where a token is (attention mixes
    values that carry no position), and the LLM gets each token's row and column from M-RoPE.
    """
    pairs = len(SHAPES) * len(COLOURS)
    labels = np.zeros(2 * pairs, dtype=np.float32)
    for o in scene.objects:
        pair = SHAPES.index(o.shape) * len(COLOURS) + list(COLOURS).index(o.colour)
        labels[pair] = 1.0
        labels[pairs + pair] = float(o.size == "large")
    return labels
