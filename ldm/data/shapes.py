"""Procedural coloured-shapes dataset: captioned 64x64 images made on the fly from a seed, no download.

This is the embedded default data set. Its grammar is small enough that a generated image can be checked
automatically (``ldm.eval.shapes_eval``), so the exact spec below is part of the public contract.

Image: 64x64 RGB, black background, one or two objects drawn with hard (not anti-aliased) edges, so every
pixel is either black or exactly one of the seven palette colours.

Object: ``ShapeSpec(shape, colour, size, position)``

* ``shape``: ``circle`` (disk of diameter ``d``), ``square`` (axis-aligned, side ``d``), ``triangle`` (pointing
  up, base ``d`` and height ``d``), each centred on its cell centre. A pixel is painted when its centre
  ``(x + 0.5, y + 0.5)`` lies inside the shape.
* ``colour``: red, green, blue, yellow, magenta, cyan, white (the seven non-black corners of the RGB cube).
* ``size``: small (``d = 16`` px), large (``d = 28`` px).
* ``position``: top left (16, 16), top right (48, 16), bottom left (16, 48), bottom right (48, 48),
  center (32, 32); coordinates are ``(cx, cy)`` with ``y`` pointing down.

Layout rule for two objects: they always sit in two *distinct corners* (never the center) and have different
(colour, shape) pairs. Corner cells are 32 px apart, so even two large objects (28 px) in neighbouring corners
leave a 4 px black gap and never touch; with the center allowed, a large object would overlap any corner.

Caption: ``"a {size} {colour} {shape} in the {position}"`` where the size word and the position phrase are each
left out independently at random (probabilities ``p_size_word`` / ``p_position_word`` of keeping them), so
"a red circle", "a small red circle", "a red circle in the top left" are all in the distribution. Two objects
are joined by ``" and "``.

Held out: the colour-shape pairs in ``HELD_OUT_PAIRS`` never appear in the train or validation split (unless
``include_held_out=True``), so generalization to unseen combinations can be measured.

Determinism: item ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, split_id, i])``; it does
not depend on which worker asks or in which order.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}

SIZES: dict[str, int] = {"small": 16, "large": 28}

POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}

CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "triangle"), ("cyan", "square"), ("magenta", "circle")}
)

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

SPLITS: dict[str, int] = {"train": 0, "validation": 1}


class ShapeSpec(NamedTuple):
    """One object. ``size`` / ``position`` may be ``None`` in a parsed prompt that does not name them."""

    shape: str
    colour: str
    size: Optional[str] = None
    position: Optional[str] = None


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: str, position: str) -> np.ndarray:
    """Boolean ``[64, 64]`` mask of one object (cached: there are only 3 x 2 x 5 of them).

    With pixel centres ``(px, py) = (x + 0.5, y + 0.5)``, cell centre ``(cx, cy)`` and extent ``d``:

    * circle:   ``(px - cx)^2 + (py - cy)^2 <= (d / 2)^2``
    * square:   ``|px - cx| <= d / 2`` and ``|py - cy| <= d / 2``
    * triangle: ``cy - d/2 <= py <= cy + d/2`` and ``|px - cx| <= (py - (cy - d/2)) / 2`` (apex up)
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {tuple(POSITIONS)}")
    d = float(SIZES[size])
    cx, cy = POSITIONS[position]
    coords = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    px, py = coords[None, :], coords[:, None]
    if shape == "circle":
        mask = (px - cx) ** 2 + (py - cy) ** 2 <= (d / 2) ** 2
    elif shape == "square":
        mask = (np.abs(px - cx) <= d / 2) & (np.abs(py - cy) <= d / 2)
    else:
        top = cy - d / 2
        mask = (py >= top) & (py <= cy + d / 2) & (np.abs(px - cx) <= (py - top) / 2)
    mask = np.ascontiguousarray(mask)
    mask.flags.writeable = False
    return mask


def _check_spec(spec: ShapeSpec) -> None:
    if spec.colour not in COLOURS:
        raise ValueError(f"unknown colour {spec.colour!r}; expected one of {tuple(COLOURS)}")
    if spec.size is None or spec.position is None:
        raise ValueError(f"cannot render {spec}: size and position must be given")


def render(specs: Sequence[ShapeSpec]) -> np.ndarray:
    """Draw objects on a black background: ``uint8 [64, 64, 3]``; later objects paint over earlier ones."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for spec in specs:
        _check_spec(spec)
        image[shape_mask(spec.shape, spec.size, spec.position)] = COLOURS[spec.colour]
    return image


def object_phrase(spec: ShapeSpec, with_size: bool = True, with_position: bool = True) -> str:
    """``"a {size} {colour} {shape} in the {position}"``; missing (``None``) or unwanted parts are left out."""
    words = ["a"]
    if with_size and spec.size is not None:
        words.append(spec.size)
    words += [spec.colour, spec.shape]
    if with_position and spec.position is not None:
        words += ["in the", spec.position]
    return " ".join(words)


def caption_for(
    specs: Sequence[ShapeSpec],
    rng=None,
    p_size_word: float = 0.5,
    p_position_word: float = 0.5,
) -> str:
    """Caption for ``specs``; each object keeps its size word with prob. ``p_size_word`` and its position
    phrase with prob. ``p_position_word``. ``rng`` is anything with ``.random()`` (numpy Generator,
    ``random.Random``); ``rng=None`` keeps every word that is known."""
    if not specs:
        raise ValueError("caption_for needs at least one object")
    phrases = []
    for spec in specs:
        keep_size = True if rng is None else bool(rng.random() < p_size_word)
        keep_position = True if rng is None else bool(rng.random() < p_position_word)
        phrases.append(object_phrase(spec, keep_size, keep_position))
    return " and ".join(phrases)


def sample_specs(rng: np.random.Generator, pairs: Sequence[tuple[str, str]], two_object_prob: float) -> list[ShapeSpec]:
    """Draw one scene: one object anywhere, or two objects with distinct pairs in two distinct corners."""
    sizes = tuple(SIZES)
    if rng.random() < two_object_prob:
        first, second = rng.choice(len(pairs), size=2, replace=False)
        corners = rng.choice(len(CORNERS), size=2, replace=False)
        return [
            ShapeSpec(pairs[k][1], pairs[k][0], sizes[rng.integers(len(sizes))], CORNERS[c])
            for k, c in zip((first, second), corners)
        ]
    colour, shape = pairs[rng.integers(len(pairs))]
    positions = tuple(POSITIONS)
    return [ShapeSpec(shape, colour, sizes[rng.integers(len(sizes))], positions[rng.integers(len(positions))])]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


class ShapesDataset(Dataset):
    """Captioned coloured shapes; ``dataset[i] = {image_key: float32 [3, 64, 64] in [-1, 1], caption_key: str}``.

    Args:
        split: ``"train"`` or ``"validation"`` (separate seed streams).
        num_samples: length; default 50000 for train, 1000 for validation.
        seed: base seed; item ``i`` uses ``default_rng([seed, split_id, i])``.
        include_held_out: allow the ``HELD_OUT_PAIRS`` (e.g. to evaluate generalization); off by default.
        two_object_prob: probability that an item has two objects.
        p_size_word / p_position_word: probability that a caption keeps an object's size word / position phrase.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: Optional[int] = None,
        seed: int = 0,
        include_held_out: bool = False,
        two_object_prob: float = 0.5,
        p_size_word: float = 0.5,
        p_position_word: float = 0.5,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = 50000 if split == "train" else 1000
        if int(num_samples) != num_samples or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        for name, p in (("two_object_prob", two_object_prob), ("p_size_word", p_size_word),
                        ("p_position_word", p_position_word)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        if image_key == caption_key:
            raise ValueError(f"image_key and caption_key must differ, both are {image_key!r}")
        self.split = split
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.include_held_out = bool(include_held_out)
        self.two_object_prob = float(two_object_prob)
        self.p_size_word = float(p_size_word)
        self.p_position_word = float(p_position_word)
        self.image_key = image_key
        self.caption_key = caption_key
        self.pairs = ALL_PAIRS if include_held_out else TRAIN_PAIRS

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.num_samples}")
        index %= self.num_samples
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def sample(self, index: int) -> tuple[list[ShapeSpec], str]:
        """The objects of item ``index`` and its caption (both from the item's own RNG)."""
        rng = self._rng(int(index))
        specs = sample_specs(rng, self.pairs, self.two_object_prob)
        return specs, caption_for(specs, rng, self.p_size_word, self.p_position_word)

    def describe(self, index: int) -> list[ShapeSpec]:
        """Structured ground truth of item ``index`` (full size and position, whatever the caption says)."""
        return self.sample(index)[0]

    render = staticmethod(render)
    caption_for = staticmethod(caption_for)

    def __getitem__(self, index: int) -> dict:
        specs, caption = self.sample(index)
        return {self.image_key: image_to_tensor(render(specs)), self.caption_key: caption}

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, num_samples={self.num_samples}, seed={self.seed}, "
                f"include_held_out={self.include_held_out})")
