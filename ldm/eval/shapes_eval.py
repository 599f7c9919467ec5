"""Automatic scoring of generated shapes images against their prompts (see ``ldm.data.shapes`` for the grammar).

Pipeline for one image:

1. Pixel colours. The palette is exactly the seven non-black corners of the RGB cube, so the nearest palette
   colour (or black background) of a pixel ``v in [0, 1]^3`` is its corner ``round(v)``: channel ``c`` is *on*
   when ``v_c > 0.5``. A pixel whose largest channel distance to that corner exceeds ``tolerance`` is ambiguous
   and treated as background (the default ``tolerance = 0.5`` keeps every pixel, i.e. plain rounding).
2. Objects. 4-connected components of equal colour (pure numpy label propagation with pointer jumping);
   components smaller than ``min_pixels`` (20 at 64 px) are noise and dropped.
3. Attributes of a component with bounding box ``w x h``, ``n`` pixels and centroid row ``y_bar``:
   * size: extent ``max(w, h)`` against 22 px (small = 16, large = 28);
   * position: nearest of the five cell centres to the bounding-box centre;
   * shape: nearest prototype in (fill ratio ``n / (w h)``, ``1.7 * (y_bar - box centre) / h``) space:
     square (1, 0), circle (pi/4, 0), triangle (1/2, 1.7/6) -- an upward triangle holds its mass low.
   Coordinates scale with the image side, so any square image works (the spec is 64 x 64).

Scoring a prompt (``score_prompt``): the prompt is parsed into objects; each named object is matched one-to-one
with a detected object (best assignment over permutations, at most a handful of objects). The image is
*correct* when every named object has a match with the right colour and shape, the right size and position
where the prompt names them, and there is no extra object (detections beyond the named ones make it wrong:
"a red circle" is not answered by a red circle and a blue square).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.data.shapes import (
    COLOURS,
    CORNERS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    ShapeSpec,
    object_phrase,
)

# Channel bits (r, g, b) of each palette colour; index = 4 r + 2 g + b, 0 = black background.
_CODE_TO_COLOUR: dict[int, str] = {
    4 * (r // 255) + 2 * (g // 255) + (b // 255): name for name, (r, g, b) in COLOURS.items()
}

SIZE_THRESHOLD_PX = 0.5 * (SIZES["small"] + SIZES["large"])  # 22 px at 64 px
MIN_PIXELS = 20
_OFFSET_WEIGHT = 1.7
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.0),
    "circle": (math.pi / 4, 0.0),
    "triangle": (0.5, _OFFSET_WEIGHT / 6),
}

CATEGORIES = ("single", "position", "two_objects", "unseen_pairs")


@dataclass(frozen=True)
class Detection:
    """One detected object; ``centre`` is the bounding-box centre ``(x, y)`` in pixels of the input image."""

    colour: str
    shape: str
    size_px: int
    centre: tuple[float, float]
    position: str
    pixel_count: int
    size: str
    fill_ratio: float


# ---------------------------------------------------------------------------------------------------- prompts

_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_SIZE_RE = "|".join(SIZES)
_POSITION_RE = "|".join(sorted(POSITIONS, key=len, reverse=True))
_OBJECT_RE = re.compile(
    rf"a (?:(?P<size>{_SIZE_RE}) )?(?P<colour>{_COLOUR_RE}) (?P<shape>{_SHAPE_RE})"
    rf"(?: in the (?P<position>{_POSITION_RE}))?"
)


def parse_prompt(text: str) -> list[ShapeSpec]:
    """Invert the caption grammar: ``"a small red circle in the top left and a blue square"`` ->
    ``[ShapeSpec('circle', 'red', 'small', 'top left'), ShapeSpec('square', 'blue', None, None)]``.

    Case, repeated spaces and a final full stop are forgiven; anything else outside the grammar is a ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}")
    normalized = " ".join(text.lower().split()).rstrip(".").strip()
    if not normalized:
        raise ValueError("empty prompt")
    specs = []
    for part in normalized.split(" and "):
        match = _OBJECT_RE.fullmatch(part)
        if match is None:
            raise ValueError(
                f"prompt {text!r} is outside the shapes grammar (could not parse {part!r}; expected "
                f"'a [small|large] <colour> <shape> [in the <position>]' joined by ' and ')"
            )
        specs.append(ShapeSpec(match["shape"], match["colour"], match["size"], match["position"]))
    return specs


# ---------------------------------------------------------------------------------------------------- detection

def to_unit_rgb(image: Any) -> np.ndarray:
    """``uint8 [H, W, 3]`` (0..255) or float ``[H, W, 3]`` / ``[3, H, W]`` in ``[-1, 1]`` (numpy or torch)
    -> float32 ``[H, W, 3]`` in ``[0, 1]``."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float().numpy() if image.dtype != torch.uint8 else image.numpy()
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"expected one image [H, W, 3] or [3, H, W], got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected uint8 or a float image in [-1, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or inf")
    return ((array.astype(np.float32) + 1.0) / 2.0).clip(0.0, 1.0)


def colour_codes(rgb: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
    """Per-pixel palette index ``4 r + 2 g + b`` of the nearest RGB-cube corner (0 = background), ``[H, W]`` int.

    Pixels farther than ``tolerance`` (max over channels) from their corner are set to 0."""
    on = rgb > 0.5
    codes = (on[..., 0] * 4 + on[..., 1] * 2 + on[..., 2]).astype(np.int64)
    if tolerance < 0.5:
        distance = np.abs(rgb - on.astype(rgb.dtype)).max(axis=-1)
        codes[distance > tolerance] = 0
    return codes


def label_components(codes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero code: ``[H, W]`` int labels, -1 for background.

    Each pixel's label is the smallest flat index in its component, found by min-propagation between equal
    neighbours alternated with pointer jumping (``label <- label[label]``), which converges in a few rounds."""
    h, w = codes.shape
    index = np.arange(h * w).reshape(h, w)
    labels = np.where(codes > 0, index, -1).reshape(-1)
    # Edges between 4-neighbours of the same colour, both ends as flat indices.
    same_right = (codes[:, :-1] == codes[:, 1:]) & (codes[:, :-1] > 0)
    same_down = (codes[:-1, :] == codes[1:, :]) & (codes[:-1, :] > 0)
    a = np.concatenate([index[:, :-1][same_right], index[:-1, :][same_down]])
    b = np.concatenate([index[:, 1:][same_right], index[1:, :][same_down]])
    if a.size:
        while True:
            old = labels.copy()
            low = np.minimum(labels[a], labels[b])
            np.minimum.at(labels, a, low)
            np.minimum.at(labels, b, low)
            foreground = labels >= 0
            labels[foreground] = labels[labels[foreground]]
            if np.array_equal(labels, old):
                break
    return labels.reshape(h, w)


def _classify_shape(fill: float, offset: float) -> str:
    point = (fill, _OFFSET_WEIGHT * offset)
    return min(SHAPE_PROTOTYPES, key=lambda s: math.dist(point, SHAPE_PROTOTYPES[s]))


def nearest_position(x: float, y: float, image_size: int = IMAGE_SIZE) -> str:
    scale = image_size / IMAGE_SIZE
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] * scale - x) ** 2 + (POSITIONS[p][1] * scale - y) ** 2)


def detect_objects(image: Any, min_pixels: Optional[int] = None, tolerance: float = 0.5) -> list[Detection]:
    """Objects in one image (see the module docstring), largest first.

    ``image``: uint8 ``[H, W, 3]`` or float in ``[-1, 1]`` (``[H, W, 3]`` or ``[3, H, W]``), square.
    ``min_pixels``: smallest blob kept; default 20 at 64 x 64, scaled with the image area."""
    rgb = to_unit_rgb(image)
    h, w = rgb.shape[:2]
    if h != w:
        raise ValueError(f"expected a square image, got {h} x {w}")
    scale = w / IMAGE_SIZE
    if min_pixels is None:
        min_pixels = max(1, round(MIN_PIXELS * scale * scale))
    codes = colour_codes(rgb, tolerance)
    labels = label_components(codes)
    flat = labels.reshape(-1)
    roots, counts = np.unique(flat[flat >= 0], return_counts=True)
    detections = []
    ys_all, xs_all = np.divmod(np.arange(h * w), w)
    for root, count in zip(roots, counts):
        if count < min_pixels:
            continue
        members = flat == root
        ys, xs = ys_all[members], xs_all[members]
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        bw, bh = int(x1 - x0), int(y1 - y0)
        fill = float(count) / (bw * bh)
        box_cx, box_cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        offset = (float(ys.mean()) + 0.5 - box_cy) / bh
        extent = max(bw, bh)
        detections.append(Detection(
            colour=_CODE_TO_COLOUR[int(codes.reshape(-1)[root])],
            shape=_classify_shape(fill, offset),
            size_px=extent,
            centre=(float(box_cx), float(box_cy)),
            position=nearest_position(box_cx, box_cy, w),
            pixel_count=int(count),
            size="large" if extent > SIZE_THRESHOLD_PX * scale else "small",
            fill_ratio=fill,
        ))
    detections.sort(key=lambda d: -d.pixel_count)
    return detections


# ---------------------------------------------------------------------------------------------------- scoring

_ATTRIBUTES = ("colour", "shape", "size", "position")


def _agreement(spec: ShapeSpec, det: Detection) -> dict[str, bool]:
    return {
        "colour": spec.colour == det.colour,
        "shape": spec.shape == det.shape,
        "size": spec.size is None or spec.size == det.size,
        "position": spec.position is None or spec.position == det.position,
    }


def match_objects(specs: Sequence[ShapeSpec], detections: Sequence[Detection]) -> list[Optional[int]]:
    """One-to-one assignment of named objects to detections maximizing (fully matched objects, matched
    attributes); ``result[k]`` is the detection index of ``specs[k]`` or ``None`` when there are too few."""
    k, n = len(specs), len(detections)
    slots: list[Optional[int]] = list(range(n)) + [None] * max(0, k - n)
    best, best_score = None, None
    for perm in itertools.permutations(slots, k):
        full = attrs = 0
        for spec, j in zip(specs, perm):
            if j is None:
                continue
            agree = _agreement(spec, detections[j])
            full += all(agree.values())
            attrs += sum(agree.values())
        score = (full, attrs)
        if best_score is None or score > best_score:
            best, best_score = list(perm), score
    return best if best is not None else []


def score_prompt(prompt: str | Sequence[ShapeSpec], image: Any, **detect_kwargs) -> dict:
    """Does ``image`` show ``prompt``? Returns a dict with

    ``correct`` (everything below), ``colour_ok`` / ``shape_ok`` / ``size_ok`` / ``position_ok`` (every named
    object's attribute agrees with its matched detection; unnamed size/position count as agreeing; an object
    without a match fails all), ``count_ok`` (as many detections as named objects), ``num_objects``,
    ``num_detections``, ``specs``, ``detections``, ``assignment``."""
    specs = parse_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    detections = detect_objects(image, **detect_kwargs)
    assignment = match_objects(specs, detections)
    ok = {a: True for a in _ATTRIBUTES}
    for spec, j in zip(specs, assignment):
        agree = _agreement(spec, detections[j]) if j is not None else {a: False for a in _ATTRIBUTES}
        for a in _ATTRIBUTES:
            ok[a] = ok[a] and agree[a]
    count_ok = len(detections) == len(specs)
    return {
        "correct": all(ok.values()) and count_ok,
        "colour_ok": ok["colour"],
        "shape_ok": ok["shape"],
        "size_ok": ok["size"],
        "position_ok": ok["position"],
        "count_ok": count_ok,
        "num_objects": len(specs),
        "num_detections": len(detections),
        "specs": specs,
        "detections": detections,
        "assignment": assignment,
    }


# ---------------------------------------------------------------------------------------------------- prompt set

def _build_eval_prompts(seed: int = 1234) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    sizes = tuple(SIZES)
    positions = tuple(POSITIONS)
    held_out = sorted(HELD_OUT_PAIRS)

    # single: every seen pair bare, plus 6 seen pairs with a size word.
    single = [object_phrase(ShapeSpec(s, c)) for c, s in TRAIN_PAIRS]
    for k in rng.choice(len(TRAIN_PAIRS), size=6, replace=False):
        c, s = TRAIN_PAIRS[k]
        single.append(object_phrase(ShapeSpec(s, c, sizes[rng.integers(2)])))

    # position: 25 seen pairs, each of the 5 positions 5 times.
    position: list[str] = []
    while len(position) < 25:
        c, s = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        size = sizes[rng.integers(2)] if rng.random() < 0.5 else None
        prompt = object_phrase(ShapeSpec(s, c, size, positions[len(position) % 5]))
        if prompt not in position:
            position.append(prompt)

    # two objects: 24 scenes of two distinct seen pairs in distinct corners; half name the corners.
    two: list[str] = []
    while len(two) < 24:
        a, b = rng.choice(len(TRAIN_PAIRS), size=2, replace=False)
        corners = rng.choice(len(CORNERS), size=2, replace=False)
        named = len(two) % 2 == 0
        prompt = " and ".join(
            object_phrase(ShapeSpec(TRAIN_PAIRS[k][1], TRAIN_PAIRS[k][0], None, CORNERS[q] if named else None))
            for k, q in zip((a, b), corners)
        )
        if prompt not in two:
            two.append(prompt)

    # unseen pairs: each held-out pair bare, small, large and at each of the 5 positions (8 x 3 = 24).
    unseen = []
    for c, s in held_out:
        unseen.append(object_phrase(ShapeSpec(s, c)))
        unseen += [object_phrase(ShapeSpec(s, c, size)) for size in sizes]
        unseen += [object_phrase(ShapeSpec(s, c, None, p)) for p in positions]

    return {"single": single, "position": position, "two_objects": two, "unseen_pairs": unseen}


EVAL_PROMPTS: dict[str, list[str]] = _build_eval_prompts()


def _category_of(prompt: str) -> str:
    for category, prompts in EVAL_PROMPTS.items():
        if prompt in prompts:
            return category
    return "other"


def evaluate_images(prompts_and_images: Iterable | Mapping[str, Iterable], **detect_kwargs) -> dict:
    """Score many images. Accepts ``(prompt, image)`` pairs (category looked up in ``EVAL_PROMPTS``, else
    ``"other"``), ``(category, prompt, image)`` triples, or ``{category: [(prompt, image), ...]}``.

    Returns ``{"per_category": {category: row}, "overall": row, "items": [...]}`` where a row holds ``n``,
    ``correct`` and the accuracies ``accuracy``, ``colour``, ``shape``, ``size``, ``position``, ``count``."""
    if isinstance(prompts_and_images, Mapping):
        triples = [(cat, p, im) for cat, items in prompts_and_images.items() for p, im in items]
    else:
        triples = []
        for item in prompts_and_images:
            if len(item) == 3:
                triples.append(tuple(item))
            elif len(item) == 2:
                triples.append((_category_of(item[0]), item[0], item[1]))
            else:
                raise ValueError(f"expected (prompt, image) or (category, prompt, image), got {len(item)} items")
    items = []
    for category, prompt, image in triples:
        result = score_prompt(prompt, image, **detect_kwargs)
        items.append({"category": category, "prompt": prompt, **result})

    def row(group: list[dict]) -> dict:
        n = len(group)
        mean = (lambda key: sum(bool(r[key]) for r in group) / n) if n else (lambda key: float("nan"))
        return {
            "n": n,
            "correct": sum(bool(r["correct"]) for r in group),
            "accuracy": mean("correct"),
            "colour": mean("colour_ok"),
            "shape": mean("shape_ok"),
            "size": mean("size_ok"),
            "position": mean("position_ok"),
            "count": mean("count_ok"),
        }

    order = [c for c in CATEGORIES if any(r["category"] == c for r in items)]
    order += sorted({r["category"] for r in items} - set(order))
    per_category = {c: row([r for r in items if r["category"] == c]) for c in order}
    return {"per_category": per_category, "overall": row(items), "items": items}


def format_table(results: Mapping) -> str:
    """Markdown table of ``evaluate_images`` output: one line per category and an overall line."""
    header = "| category | n | accuracy | colour | shape | size | position | count |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = list(results["per_category"].items()) + [("overall", results["overall"])]
    for name, r in rows:
        cells = [f"{r[k]:.3f}" for k in ("accuracy", "colour", "shape", "size", "position", "count")]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
