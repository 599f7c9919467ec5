import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.shapes import (
    COLOURS,
    CORNERS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    ShapeSpec,
    caption_for,
    render,
)
from ldm.util import instantiate_from_config

# The caption grammar, written out independently of the library.
OBJECT = (
    r"a (?:(small|large) )?(red|green|blue|yellow|magenta|cyan|white) (circle|square|triangle)"
    r"(?: in the (top left|top right|bottom left|bottom right|center))?"
)
CAPTION = re.compile(rf"{OBJECT}(?: and {OBJECT})?")
PALETTE = {(0, 0, 0)} | {
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255)
}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.double() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_constants_match_spec():
    assert SHAPES == ("circle", "square", "triangle")
    assert set(map(tuple, COLOURS.values())) == PALETTE - {(0, 0, 0)}
    assert COLOURS["yellow"] == (255, 255, 0) and COLOURS["magenta"] == (255, 0, 255)
    assert SIZES == {"small": 16, "large": 28}
    assert POSITIONS == {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48),
                         "bottom right": (48, 48), "center": (32, 32)}
    assert HELD_OUT_PAIRS == {("yellow", "triangle"), ("cyan", "square"), ("magenta", "circle")}


def test_same_seed_same_items_any_order_and_different_seeds_differ():
    a, b = ShapesDataset(seed=3, num_samples=200), ShapesDataset(seed=3, num_samples=200)
    indices = list(range(40))
    first = {i: a[i] for i in indices}
    for i in reversed(indices):  # another instance, another order
        item = b[i]
        assert torch.equal(item["image"], first[i]["image"])
        assert item["caption"] == first[i]["caption"]
    other = ShapesDataset(seed=4, num_samples=200)
    differ = sum(other[i]["caption"] != first[i]["caption"] or not torch.equal(other[i]["image"], first[i]["image"])
                 for i in indices)
    assert differ >= 35
    val = ShapesDataset(split="validation", seed=3)
    assert sum(val[i]["caption"] != first[i]["caption"] for i in indices) >= 30
    assert a[-1]["caption"] == a[199]["caption"]


def test_dataloader_workers_give_the_same_items():
    ds = ShapesDataset(num_samples=16, seed=7)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert torch.equal(images, torch.stack([ds[i]["image"] for i in range(16)]))
    assert captions == [ds[i]["caption"] for i in range(16)]


def test_items_follow_the_spec():
    ds = ShapesDataset(num_samples=300, seed=1)
    for i in range(300):
        item = ds[i]
        image, caption = item["image"], item["caption"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        # Hard edges: every value is exactly -1 or 1, i.e. every pixel is black or a palette colour.
        assert torch.all((image == -1) | (image == 1))
        pixels = {tuple(p) for p in to_uint8(image).reshape(-1, 3)}
        assert pixels <= PALETTE
        match = CAPTION.fullmatch(caption)
        assert match, caption
        specs = ds.describe(i)
        named = [match.groups()[k:k + 4] for k in (0, 4) if match.group(k + 2)]
        assert len(named) == len(specs)
        for (size, colour, shape, position), spec in zip(named, specs):
            assert (colour, shape) == (spec.colour, spec.shape)
            assert size in (None, spec.size) and position in (None, spec.position)
        colours_in_image = pixels - {(0, 0, 0)}
        assert colours_in_image == {COLOURS[s.colour] for s in specs}


def test_held_out_pairs_never_in_train_or_validation():
    for split in ("train", "validation"):
        ds = ShapesDataset(split=split, num_samples=5000)
        pairs = Counter((s.colour, s.shape) for i in range(5000) for s in ds.describe(i))
        assert not set(pairs) & HELD_OUT_PAIRS
        assert len(pairs) == 21 - 3  # every other pair does appear
        for i in range(0, 5000, 50):
            caption = ds.sample(i)[1]
            for colour, shape in HELD_OUT_PAIRS:
                assert f"{colour} {shape}" not in caption
    ds = ShapesDataset(num_samples=3000, include_held_out=True)
    pairs = {(s.colour, s.shape) for i in range(3000) for s in ds.describe(i)}
    assert HELD_OUT_PAIRS <= pairs


def test_every_value_and_caption_form_appears():
    ds = ShapesDataset(num_samples=2000, seed=0)
    specs = [ds.describe(i) for i in range(2000)]
    objects = [s for scene in specs for s in scene]
    assert {s.colour for s in objects} == set(COLOURS)
    assert {s.shape for s in objects} == set(SHAPES)
    assert {s.size for s in objects} == set(SIZES)
    assert {s.position for s in objects} == set(POSITIONS)
    counts = Counter(len(scene) for scene in specs)
    assert set(counts) == {1, 2} and 0.4 < counts[2] / 2000 < 0.6
    captions = [ds.sample(i)[1] for i in range(2000)]
    forms = Counter()
    for caption in captions:
        for phrase in caption.split(" and "):
            forms[(phrase.split()[1] in SIZES, " in the " in phrase)] += 1
    assert set(forms) == {(False, False), (True, False), (False, True), (True, True)}
    bare_caption = re.compile(r"a (red|green|blue|yellow|white|cyan|magenta) (circle|square|triangle)")
    bare = [c for c in captions if bare_caption.fullmatch(c)]
    assert len(bare) > 50  # short prompts like "a red circle" are in the distribution


def test_two_objects_distinct_corners_pairs_and_never_touch():
    ds = ShapesDataset(num_samples=1000, seed=2)
    seen = 0
    for i in range(1000):
        scene = ds.describe(i)
        if len(scene) != 2:
            continue
        seen += 1
        a, b = scene
        assert a.position in CORNERS and b.position in CORNERS and a.position != b.position
        assert (a.colour, a.shape) != (b.colour, b.shape)
        ma = render([a]).any(-1)
        mb = render([b]).any(-1)
        # Dilate a by one pixel (8-neighbourhood): the objects must stay apart, so components never merge.
        padded = np.pad(ma, 1)
        dilated = np.zeros_like(ma)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                dilated |= padded[dy:dy + 64, dx:dx + 64]
        assert not (dilated & mb).any()
        both = render(scene)
        assert (both.any(-1) == (ma | mb)).all()
    assert seen > 400


@pytest.mark.parametrize("position", list(POSITIONS))
def test_object_pixel_sizes(position):
    cx, cy = POSITIONS[position]
    for size, d in SIZES.items():
        for shape in SHAPES:
            mask = render([ShapeSpec(shape, "white", size, position)]).any(-1)
            ys, xs = np.nonzero(mask)
            width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            area = mask.sum()
            assert width == d, (shape, size, width)
            assert d - 1 <= height <= d
            assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 0.5
            assert abs((ys.min() + ys.max() + 1) / 2 - cy) <= 0.5
            if shape == "square":
                assert area == d * d
            elif shape == "circle":
                assert abs(area - np.pi * d * d / 4) / (np.pi * d * d / 4) < 0.06
            else:
                assert abs(area - d * d / 2) / (d * d / 2) < 0.1
                # Upward: the bottom row is the widest, the top row the narrowest.
                rows = mask[ys.min():ys.max() + 1].sum(1)
                assert rows[-1] == d and rows[0] <= 2 and np.all(np.diff(rows) >= 0)


def test_render_rejects_bad_specs_and_is_fast():
    with pytest.raises(ValueError, match="colour"):
        render([ShapeSpec("circle", "purple", "small", "center")])
    with pytest.raises(ValueError, match="shape"):
        render([ShapeSpec("hexagon", "red", "small", "center")])
    with pytest.raises(ValueError, match="size and position"):
        render([ShapeSpec("circle", "red", None, "center")])
    scenes = [ShapesDataset(num_samples=2000).describe(i) for i in range(2000)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene)
    assert time.perf_counter() - start < 2.0  # thousands per second even on a loaded machine


def test_caption_for_full_and_random():
    specs = [ShapeSpec("circle", "red", "small", "top left"), ShapeSpec("square", "blue", "large", "bottom right")]
    assert caption_for(specs) == "a small red circle in the top left and a large blue square in the bottom right"
    assert caption_for(specs[:1], np.random.default_rng(0), p_size_word=0.0, p_position_word=0.0) == "a red circle"
    assert ShapesDataset.caption_for(specs[1:], None) == "a large blue square in the bottom right"


def test_build_from_yaml_with_custom_keys():
    config = OmegaConf.create(
        "target: ldm.data.shapes.ShapesDataset\n"
        "params: {split: validation, num_samples: 10, seed: 5, image_key: jpg, caption_key: txt}\n"
    )
    ds = instantiate_from_config(config, path="data.params.validation")
    assert len(ds) == 10 and ds.split == "validation"
    item = ds[3]
    assert set(item) == {"jpg", "txt"} and item["jpg"].shape == (3, 64, 64)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(num_samples=0)
    with pytest.raises(ValueError, match="two_object_prob"):
        ShapesDataset(two_object_prob=1.5)
    with pytest.raises(IndexError):
        ShapesDataset(num_samples=5)[5]
    assert len(ShapesDataset()) == 50000 and len(ShapesDataset(split="validation")) == 1000
