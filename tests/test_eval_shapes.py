from collections import deque

import numpy as np
import pytest
import torch

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
from ldm.eval.shapes_eval import (
    EVAL_PROMPTS,
    _build_eval_prompts,
    detect_objects,
    evaluate_images,
    format_table,
    label_components,
    parse_prompt,
    score_prompt,
)

N_ITEMS = 800


@pytest.fixture(scope="module")
def scenes():
    """Ground truth scenes including held-out pairs, one and two objects, with their dataset captions."""
    ds = ShapesDataset(split="validation", num_samples=N_ITEMS, seed=11, include_held_out=True)
    out = [ds.sample(i) for i in range(N_ITEMS)]
    objects = [s for specs, _ in out for s in specs]
    assert {(s.colour, s.shape) for s in objects} >= HELD_OUT_PAIRS
    assert sum(len(specs) == 2 for specs, _ in out) > N_ITEMS // 3
    return out


def blur_and_noise(image_uint8, rng, sigma=0.8, noise_std=0.05):
    """Independent degradation: separable Gaussian blur (float64) then N(0, noise_std) in [-1, 1] units."""
    x = image_uint8.astype(np.float64) / 127.5 - 1
    t = np.arange(-2, 3)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    p = np.pad(x, ((2, 2), (2, 2), (0, 0)), mode="edge")
    p = sum(k[i] * p[i:i + 64] for i in range(5))
    p = sum(k[i] * p[:, i:i + 64] for i in range(5))
    return (p + rng.normal(0, noise_std, p.shape)).astype(np.float32)


def test_parse_prompt_inverts_the_caption_grammar(scenes):
    for specs, caption in scenes[:300]:
        parsed = parse_prompt(caption)
        assert [(p.colour, p.shape) for p in parsed] == [(s.colour, s.shape) for s in specs]
        for p, s in zip(parsed, specs):
            assert p.size in (None, s.size) and p.position in (None, s.position)
        assert parse_prompt(caption_for(specs)) == specs  # full caption: everything comes back
    assert parse_prompt("  A Red   Circle. ") == [ShapeSpec("circle", "red", None, None)]
    assert parse_prompt("a large cyan square in the center and a small white triangle") == [
        ShapeSpec("square", "cyan", "large", "center"), ShapeSpec("triangle", "white", "small", None)]


@pytest.mark.parametrize("bad", [
    "", "a purple circle", "a red hexagon", "red circle", "a red circle in the middle", "a red circle and",
    "two red circles", "a medium red circle", "a red circle in the top left corner", "a circle", 42,
])
def test_parse_prompt_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_prompt(bad)


def test_label_components_matches_breadth_first_search():
    rng = np.random.default_rng(0)
    for trial in range(30):
        # Blobby random maps: upsampled random codes with speckle, 3 colours + background.
        coarse = rng.integers(0, 4, (8, 8))
        codes = np.kron(coarse, np.ones((4, 4), dtype=np.int64))
        speckle = rng.random(codes.shape) < 0.1
        codes[speckle] = rng.integers(0, 4, speckle.sum())
        labels = label_components(codes)
        # Reference: plain BFS over 4-neighbours with equal non-zero code.
        ref = -np.ones(codes.shape, dtype=np.int64)
        next_id = 0
        for y0 in range(32):
            for x0 in range(32):
                if codes[y0, x0] == 0 or ref[y0, x0] >= 0:
                    continue
                ref[y0, x0] = next_id
                queue = deque([(y0, x0)])
                while queue:
                    y, x = queue.popleft()
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < 32 and 0 <= nx < 32 and ref[ny, nx] < 0 and codes[ny, nx] == codes[y, x]:
                            ref[ny, nx] = next_id
                            queue.append((ny, nx))
                next_id += 1
        assert ((labels >= 0) == (ref >= 0)).all()
        fg = ref >= 0
        # Same partition: the map ref-id -> label is a bijection.
        pairs = set(zip(ref[fg].tolist(), labels[fg].tolist()))
        assert len(pairs) == next_id == len(set(labels[fg].tolist()))


def test_detect_objects_recovers_ground_truth(scenes):
    for specs, _ in scenes[:200]:
        image = render(specs)
        detections = detect_objects(image)
        assert len(detections) == len(specs)
        found = {(d.colour, d.shape, d.size, d.position) for d in detections}
        assert found == {(s.colour, s.shape, s.size, s.position) for s in specs}
        for d in detections:
            true = next(s for s in specs if (s.colour, s.shape) == (d.colour, d.shape))
            assert d.pixel_count == (render([true]).any(-1)).sum()
            assert d.size_px == SIZES[true.size]
            cx, cy = POSITIONS[true.position]
            assert abs(d.centre[0] - cx) <= 0.5 and abs(d.centre[1] - cy) <= 0.5


def test_true_captions_score_correct(scenes):
    correct = sum(score_prompt(caption, render(specs))["correct"] for specs, caption in scenes)
    full = sum(score_prompt(caption_for(specs), render(specs))["correct"] for specs, _ in scenes)
    assert correct / len(scenes) >= 0.99
    assert full / len(scenes) >= 0.99


def test_true_captions_survive_noise_and_blur(scenes):
    rng = np.random.default_rng(1)
    correct = 0
    for specs, _ in scenes:
        noisy = blur_and_noise(render(specs), rng)
        assert noisy.std() > 0.1
        correct += score_prompt(caption_for(specs), torch.from_numpy(noisy).permute(2, 0, 1))["correct"]
    assert correct / len(scenes) >= 0.95


def _other(values, current, rng):
    choices = [v for v in values if v != current]
    return choices[rng.integers(len(choices))]


@pytest.mark.parametrize("attribute", ["colour", "shape", "position", "size"])
def test_mismatched_captions_score_wrong(scenes, attribute):
    rng = np.random.default_rng({"colour": 0, "shape": 1, "position": 2, "size": 3}[attribute])
    options = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES)}
    wrong = 0
    flag_ok = 0
    for specs, _ in scenes[:300]:
        k = rng.integers(len(specs))
        values = options[attribute]
        if attribute == "position" and len(specs) == 2:
            values = list(CORNERS)
        changed = specs[k]._replace(**{attribute: _other(values, getattr(specs[k], attribute), rng)})
        prompt_specs = [changed if j == k else s for j, s in enumerate(specs)]
        result = score_prompt(caption_for(prompt_specs), render(specs))
        wrong += not result["correct"]
        if len(specs) == 1:
            # A single object: exactly the changed attribute is reported wrong.
            expected = {a: a != attribute for a in ("colour", "shape", "position", "size")}
            flag_ok += all(result[f"{a}_ok"] == v for a, v in expected.items())
        else:
            flag_ok += 1
    assert wrong == 300
    assert flag_ok == 300


def test_extra_or_missing_objects_score_wrong(scenes):
    two = [specs for specs, _ in scenes if len(specs) == 2][:50]
    for specs in two:
        result = score_prompt(caption_for(specs[:1]), render(specs))
        assert not result["correct"] and not result["count_ok"] and result["colour_ok"] and result["shape_ok"]
        result = score_prompt(caption_for(specs), render(specs[:1]))
        assert not result["correct"] and not result["count_ok"] and not result["colour_ok"]
    blank = np.zeros((64, 64, 3), np.uint8)
    result = score_prompt("a red circle", blank)
    assert not result["correct"] and result["num_detections"] == 0


def test_image_formats_agree(scenes):
    for specs, caption in scenes[:20]:
        image = render(specs)
        as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        reference = detect_objects(image)
        assert detect_objects(as_tensor) == reference  # float [3, H, W] in [-1, 1]
        assert detect_objects(as_tensor.permute(1, 2, 0).numpy()) == reference  # float [H, W, 3]
        big = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))  # 128 x 128: same scene at twice the scale
        big_found = {(d.colour, d.shape, d.size, d.position) for d in detect_objects(big)}
        assert big_found == {(d.colour, d.shape, d.size, d.position) for d in reference}
        assert score_prompt(caption, big)["correct"]
    with pytest.raises(ValueError):
        detect_objects(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError):
        detect_objects(np.zeros((64, 64, 4), np.uint8))


def test_eval_prompts_are_fixed_and_well_formed():
    assert EVAL_PROMPTS == _build_eval_prompts()
    assert list(EVAL_PROMPTS) == ["single", "position", "two_objects", "unseen_pairs"]
    for category, prompts in EVAL_PROMPTS.items():
        assert 20 <= len(prompts) <= 40 and len(set(prompts)) == len(prompts), category
        for prompt in prompts:
            specs = parse_prompt(prompt)
            pairs = {(s.colour, s.shape) for s in specs}
            if category == "unseen_pairs":
                assert len(specs) == 1 and pairs <= HELD_OUT_PAIRS
            else:
                assert not pairs & HELD_OUT_PAIRS
            if category == "single":
                assert len(specs) == 1 and specs[0].position is None
            if category == "position":
                assert len(specs) == 1 and specs[0].position is not None
            if category == "two_objects":
                assert len(specs) == 2 and len(pairs) == 2
                named = [s.position for s in specs if s.position]
                assert len(set(named)) == len(named) and set(named) <= set(CORNERS)
    assert {parse_prompt(p)[0].position for p in EVAL_PROMPTS["position"]} == set(POSITIONS)
    assert {(s.colour, s.shape) for p in EVAL_PROMPTS["unseen_pairs"] for s in parse_prompt(p)} == HELD_OUT_PAIRS


def _ideal_image(prompt):
    """Render exactly what a prompt asks for, filling unnamed size/position (two objects: corners)."""
    specs = parse_prompt(prompt)
    free = [c for c in CORNERS if c not in {s.position for s in specs}]
    filled = []
    for s in specs:
        position = s.position or (free.pop(0) if len(specs) == 2 else "center")
        filled.append(ShapeSpec(s.shape, s.colour, s.size or "large", position))
    return render(filled)


def test_evaluate_images_and_table():
    pairs = [(p, _ideal_image(p)) for prompts in EVAL_PROMPTS.values() for p in prompts]
    results = evaluate_images(pairs)
    assert list(results["per_category"]) == list(EVAL_PROMPTS)
    for category, row in results["per_category"].items():
        assert row["n"] == len(EVAL_PROMPTS[category]) and row["accuracy"] == 1.0
    assert results["overall"]["n"] == len(pairs)

    # Wrong images: every object's colour rotated to the next palette colour; shapes and places kept.
    names = list(COLOURS)
    rotate = {COLOURS[c]: COLOURS[names[(i + 1) % len(names)]] for i, c in enumerate(names)}

    def recoloured(image):
        out = image.copy()
        for old, new in rotate.items():
            out[(image == old).all(-1)] = new
        return out

    wrong = {c: [(p, recoloured(_ideal_image(p))) for p in ps] for c, ps in EVAL_PROMPTS.items()}
    bad = evaluate_images(wrong)
    for category, row in bad["per_category"].items():
        assert row["accuracy"] == 0.0 and row["colour"] == 0.0, (category, row)
        assert row["shape"] == 1.0 and row["position"] == 1.0 and row["count"] == 1.0, (category, row)

    mixed = evaluate_images([("single", "a red circle", _ideal_image("a red circle")),
                             ("single", "a red circle", _ideal_image("a blue circle")),
                             ("custom", "a green square", _ideal_image("a green square"))])
    assert mixed["per_category"]["single"]["accuracy"] == 0.5
    assert mixed["per_category"]["single"]["colour"] == 0.5 and mixed["per_category"]["single"]["shape"] == 1.0
    assert mixed["per_category"]["custom"]["n"] == 1
    table = format_table(mixed)
    lines = table.splitlines()
    assert lines[0].startswith("| category | n | accuracy")
    assert "| single | 2 | 0.500 |" in table and "| custom | 1 | 1.000 |" in table
    assert lines[-1].startswith("| overall | 3 | 0.667 |")
