import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, features

from ldm.data.image_folder import CaptionedImageFolder
from ldm.util import instantiate_from_config


def save(path, array, fmt=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt, **kwargs)


def solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def write_metadata(root, entries):
    with open(root / "metadata.jsonl", "w") as f:
        for entry in entries:
            f.write((entry if isinstance(entry, str) else json.dumps(entry)) + "\n")


def expected(rgb):
    return torch.tensor(rgb, dtype=torch.float64) / 127.5 - 1


def test_metadata_captions_recursive_and_transform(tmp_path):
    save(tmp_path / "a.png", solid(40, 80, (255, 0, 0)))
    save(tmp_path / "sub" / "b.jpg", solid(100, 50, (0, 0, 255)), quality=100)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a red picture"},
                              {"file_name": "sub/b.jpg", "text": "a blue picture"}])
    ds = CaptionedImageFolder(tmp_path, size=32)
    assert len(ds) == 2
    items = {ds[i]["caption"]: ds[i]["image"] for i in range(2)}
    assert set(items) == {"a red picture", "a blue picture"}
    for caption, rgb in (("a red picture", (255, 0, 0)), ("a blue picture", (0, 0, 255))):
        image = items[caption]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        # A constant image stays constant through resize and crop (JPEG adds a few levels of error).
        err = (image.double() - expected(rgb)[:, None, None]).abs().max()
        assert err < 0.05, (caption, err)


def test_txt_sidecar_and_auto_mix(tmp_path):
    save(tmp_path / "x.png", solid(64, 64, (0, 255, 0)))
    (tmp_path / "x.txt").write_text("  green square \n")
    save(tmp_path / "y.png", solid(64, 64, (255, 255, 255)))
    write_metadata(tmp_path, [{"file_name": "y.png", "caption": "white"}])
    ds = CaptionedImageFolder(tmp_path, size=16)  # auto: metadata for y, sidecar for x
    assert sorted(ds[i]["caption"] for i in range(2)) == ["green square", "white"]
    with pytest.raises(ValueError, match=r"y\.png"):
        CaptionedImageFolder(tmp_path, size=16, caption_source="txt")
    with pytest.raises(ValueError, match=r"x\.png"):
        CaptionedImageFolder(tmp_path, size=16, caption_source="metadata")


def test_center_crop_takes_the_middle(tmp_path):
    stripes = np.concatenate([solid(32, 32, (255, 0, 0)), solid(32, 32, (0, 255, 0)), solid(32, 32, (0, 0, 255))], 1)
    save(tmp_path / "s.png", stripes)
    (tmp_path / "s.txt").write_text("stripes")
    image = CaptionedImageFolder(tmp_path, size=32)[0]["image"]
    assert torch.allclose(image.double(), expected((0, 255, 0))[:, None, None].expand(3, 32, 32), atol=1e-6)


def test_resize_shorter_side_antialiased(tmp_path):
    # 1-px black/white vertical stripes shrunk 4x must average to grey (no aliasing to black or white).
    stripes = np.zeros((128, 256, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    save(tmp_path / "g.png", stripes)
    (tmp_path / "g.txt").write_text("grey")
    image = CaptionedImageFolder(tmp_path, size=32)[0]["image"]
    assert image.shape == (3, 32, 32)
    assert image.abs().max() < 0.1  # mid-grey is 0 in [-1, 1]


def test_random_crop_and_flip(tmp_path):
    # Width 48, height 16: every 16-px window of a ramp is a distinct crop; with flip it may be mirrored.
    ramp = np.zeros((16, 48, 3), dtype=np.uint8)
    ramp[..., 0] = (np.arange(48) * 5)[None, :]
    ramp[..., 1] = (np.arange(16) * 7)[:, None]
    save(tmp_path / "r.png", ramp)
    (tmp_path / "r.txt").write_text("ramp")
    source = torch.from_numpy(ramp).permute(2, 0, 1).double() / 127.5 - 1
    windows = [source[:, :, left:left + 16] for left in range(33)]

    ds = CaptionedImageFolder(tmp_path, size=16, crop="random")
    lefts = set()
    for _ in range(60):
        image = ds[0]["image"].double()
        found = [k for k, w in enumerate(windows) if torch.allclose(image, w, atol=1e-6)]
        assert len(found) == 1
        lefts.add(found[0])
    assert len(lefts) > 10

    ds = CaptionedImageFolder(tmp_path, size=16, crop="center", flip=True)
    centre = windows[16]
    kinds = set()
    for _ in range(40):
        image = ds[0]["image"].double()
        if torch.allclose(image, centre, atol=1e-6):
            kinds.add("plain")
        elif torch.allclose(image, centre.flip(-1), atol=1e-6):
            kinds.add("flipped")
        else:
            raise AssertionError("output is neither the crop nor its mirror image")
    assert kinds == {"plain", "flipped"}


def _folder_with_bad_files(root):
    save(root / "good0.png", solid(20, 20, (255, 0, 0)))
    save(root / "good1.png", solid(20, 20, (0, 255, 0)))
    (root / "bad_garbage.png").write_bytes(b"this is not an image at all" * 10)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (root / "bad_truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for name in ("good0", "good1", "bad_garbage", "bad_truncated"):
        (root / f"{name}.txt").write_text(name)


def test_corrupt_images_are_skipped_warned_once_and_counted(tmp_path, caplog):
    _folder_with_bad_files(tmp_path)
    ds = CaptionedImageFolder(tmp_path, size=8)
    assert len(ds) == 4 and ds.num_skipped == 0
    names = [p.rsplit("/", 1)[-1] for p, _ in ds.samples]
    assert names == ["bad_garbage.png", "bad_truncated.png", "good0.png", "good1.png"]
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        for _epoch in range(3):
            captions = [ds[i]["caption"] for i in range(len(ds))]
            # Bad items are replaced by the next good one (wrap-around).
            assert captions == ["good0", "good0", "good0", "good1"]
    assert ds.num_skipped == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_paths) == ["bad_garbage.png", "bad_truncated.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert {"bad_garbage.png", "bad_truncated.png"} == {
        name for r in warnings for name in ("bad_garbage.png", "bad_truncated.png") if name in r.getMessage()}

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8)


def test_verify_drops_bad_files_up_front(tmp_path, caplog):
    _folder_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds = CaptionedImageFolder(tmp_path, size=8, verify=True)
    # verify() catches the garbage file for sure; the truncated one may only fail at load time.
    assert any("bad_garbage.png" in p for p in ds.skipped_paths)
    assert len(ds) == 4 - ds.num_skipped
    assert all(ds[i]["caption"].startswith("good") for i in range(len(ds)))
    assert ds.num_skipped == 2


def test_all_bad_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("junk")
    ds = CaptionedImageFolder(tmp_path)
    with pytest.raises(RuntimeError, match="failed to load"):
        ds[0]
    with pytest.raises(ValueError, match="failed verification"):
        CaptionedImageFolder(tmp_path, verify=True)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        CaptionedImageFolder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=str(tmp_path)):
        CaptionedImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        CaptionedImageFolder(tmp_path / "nope")


def test_missing_caption_names_the_file(tmp_path):
    save(tmp_path / "has.png", solid(8, 8, (1, 2, 3)))
    (tmp_path / "has.txt").write_text("ok")
    save(tmp_path / "deep" / "orphan.png", solid(8, 8, (1, 2, 3)))
    with pytest.raises(ValueError, match=r"no caption.*deep/orphan\.png"):
        CaptionedImageFolder(tmp_path)


def test_caption_source_none_takes_uncaptioned_images(tmp_path):
    save(tmp_path / "a.png", solid(8, 8, (1, 2, 3)))
    save(tmp_path / "b.png", solid(8, 8, (4, 5, 6)))
    (tmp_path / "b.txt").write_text("ignored")
    dataset = CaptionedImageFolder(tmp_path, size=8, caption_source="none")
    assert len(dataset) == 2 and {dataset[i]["caption"] for i in range(2)} == {""}


def test_malformed_metadata_line_names_the_line(tmp_path):
    save(tmp_path / "a.png", solid(8, 8, (9, 9, 9)))
    save(tmp_path / "b.png", solid(8, 8, (9, 9, 9)))
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}, "", '{"file_name": "b.png", "text": "b"'])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: malformed JSON"):
        CaptionedImageFolder(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: file_name 'gone\.png' does not exist"):
        CaptionedImageFolder(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png"}])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: .*no caption field"):
        CaptionedImageFolder(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}, ["b.png", "b"]])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: expected a JSON object"):
        CaptionedImageFolder(tmp_path)


def test_webp_and_palette_images(tmp_path):
    assert features.check("webp"), "this PIL build lacks WebP support"
    save(tmp_path / "w.webp", solid(24, 24, (255, 255, 0)), lossless=True)
    (tmp_path / "w.txt").write_text("yellow")
    Image.fromarray(solid(24, 24, (0, 255, 255))).convert("P").save(tmp_path / "p.png")
    rgba = np.concatenate([solid(24, 24, (255, 0, 255)), np.full((24, 24, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "q.png")
    (tmp_path / "p.txt").write_text("cyan")
    (tmp_path / "q.txt").write_text("magenta")
    ds = CaptionedImageFolder(tmp_path, size=16)
    got = {ds[i]["caption"]: ds[i]["image"] for i in range(3)}
    for caption, rgb in (("yellow", (255, 255, 0)), ("cyan", (0, 255, 255)), ("magenta", (255, 0, 255))):
        assert got[caption].shape == (3, 16, 16)
        assert (got[caption].double() - expected(rgb)[:, None, None]).abs().max() < 0.02, caption


def test_build_from_config_with_custom_keys(tmp_path):
    save(tmp_path / "a.png", solid(30, 30, (0, 0, 0)))
    (tmp_path / "a.txt").write_text("black")
    ds = instantiate_from_config({
        "target": "ldm.data.image_folder.CaptionedImageFolder",
        "params": {"root": str(tmp_path), "size": 24, "crop": "random", "flip": True,
                   "image_key": "jpg", "caption_key": "txt"},
    })
    item = ds[0]
    assert set(item) == {"jpg", "txt"} and item["jpg"].shape == (3, 24, 24) and item["txt"] == "black"


def test_bad_arguments(tmp_path):
    save(tmp_path / "a.png", solid(8, 8, (0, 0, 0)))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="crop"):
        CaptionedImageFolder(tmp_path, crop="left")
    with pytest.raises(ValueError, match="caption_source"):
        CaptionedImageFolder(tmp_path, caption_source="exif")
    with pytest.raises(ValueError, match="size"):
        CaptionedImageFolder(tmp_path, size=0)
    with pytest.raises(IndexError):
        CaptionedImageFolder(tmp_path)[1]


# --- Images that trained silently wrong (issue 13, section 5) -----------------------------------------------------


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255, so mid-grey (32768) used to arrive as pure white (+1.0).
    for name, value in (("mid", 32768), ("quarter", 16384), ("black", 0), ("white", 65535)):
        Image.fromarray(np.full((12, 20), value, dtype=np.uint16)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    with Image.open(tmp_path / "mid.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit file, not an 8-bit one
    ds = CaptionedImageFolder(tmp_path, size=8)
    got = {ds[i]["caption"]: ds[i]["image"] for i in range(len(ds))}
    for name, value in (("mid", 32768), ("quarter", 16384), ("black", 0), ("white", 65535)):
        image = got[name]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        # Grey in all three channels, at value / 65535 mapped to [-1, 1]; kept in float, so well inside 1/255.
        assert (image.double() - (2 * value / 65535 - 1)).abs().max() < 1 / 255, name


def test_transparent_pixels_get_the_background_colour(tmp_path):
    # Left half: fully transparent, hiding pure red (what an editor leaves behind an erased area).
    # Right half: opaque blue. The top-right corner: blue at alpha 128, which must blend with the background.
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)
    rgba[:, 8:] = (0, 0, 255, 255)
    rgba[0, 15] = (0, 0, 255, 128)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    (tmp_path / "rgba.txt").write_text("rgba")
    # Grey + alpha (LA) and a palette image with a transparent index take the same path.
    la = np.stack([np.full((16, 16), 200, np.uint8), np.zeros((16, 16), np.uint8)], -1)
    Image.fromarray(la).save(tmp_path / "la.png")
    (tmp_path / "la.txt").write_text("la")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    palette.save(tmp_path / "pal.png", transparency=0)
    (tmp_path / "pal.txt").write_text("pal")

    def images(**kwargs):  # size 16 = the file size: no resampling, pixels compare exactly
        ds = CaptionedImageFolder(tmp_path, size=16, **kwargs)
        return {ds[i]["caption"]: ds[i]["image"].double() for i in range(len(ds))}

    for background, rgb in ((None, (255, 255, 255)), ("black", (0, 0, 0)), ([0, 128, 0], (0, 128, 0))):
        got = images() if background is None else images(background=background)
        bg = expected(rgb)[:, None, None]
        assert torch.allclose(got["rgba"][:, :, :8], bg.expand(3, 16, 8), atol=1e-6), background
        assert torch.allclose(got["rgba"][:, 1:, 8:], expected((0, 0, 255))[:, None, None].expand(3, 15, 8),
                              atol=1e-6)
        blend = np.round(np.array(rgb) * 127 / 255 + np.array([0, 0, 255]) * 128 / 255)
        assert (got["rgba"][:, 0, 15] - expected(blend)).abs().max() < 1.5 / 127.5, background
        assert torch.allclose(got["la"], bg.expand(3, 16, 16), atol=1e-6), background
        assert torch.allclose(got["pal"], bg.expand(3, 16, 16), atol=1e-6), background
    for bad in ("no-such-colour", [1, 2], [0, 0, 256], 7):
        with pytest.raises(ValueError, match="background"):
            CaptionedImageFolder(tmp_path, background=bad)


def test_exif_orientation_is_applied_before_the_crop(tmp_path):
    # Stored quadrants: top-left red, top-right green, bottom-left blue, bottom-right white. EXIF orientation 6
    # means "rotate 90 degrees clockwise to display" (a phone held upright), so the picture is
    # top-left blue, top-right red, bottom-right green, bottom-left white -- unlike any flip of the stored one.
    stored = np.zeros((16, 16, 3), dtype=np.uint8)
    stored[:8, :8], stored[:8, 8:] = (255, 0, 0), (0, 255, 0)
    stored[8:, :8], stored[8:, 8:] = (0, 0, 255), (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=100, subsampling=0, exif=exif)
    (tmp_path / "phone.txt").write_text("upright")
    image = CaptionedImageFolder(tmp_path, size=16)[0]["image"].double()
    assert image.shape == (3, 16, 16)
    quadrants = {"top-left": image[:, 2:6, 2:6], "top-right": image[:, 2:6, 10:14],
                 "bottom-left": image[:, 10:14, 2:6], "bottom-right": image[:, 10:14, 10:14]}
    want = {"top-left": (0, 0, 255), "top-right": (255, 0, 0), "bottom-left": (255, 255, 255),
            "bottom-right": (0, 255, 0)}
    for where, rgb in want.items():
        err = (quadrants[where] - expected(rgb)[:, None, None]).abs().max()
        assert err < 0.1, (where, err)  # JPEG error is a few levels; a wrong quadrant is off by ~2


def test_caption_files_that_are_not_utf8_name_the_file(tmp_path):
    save(tmp_path / "a.png", solid(8, 8, (1, 2, 3)))
    save(tmp_path / "b.png", solid(8, 8, (1, 2, 3)))
    (tmp_path / "a.txt").write_bytes("\ufeffa caf\u00e9".encode("utf-8"))  # BOM (Notepad): dropped, not captioned
    (tmp_path / "b.txt").write_bytes("a caf\u00e9".encode("latin-1"))  # 0xe9 alone is not UTF-8
    # A caption problem is a folder problem: ValueError at construction naming the file, as for a missing caption.
    with pytest.raises(ValueError, match=r"b\.txt: not valid UTF-8 \(byte e9 at offset 5"):
        CaptionedImageFolder(tmp_path)
    (tmp_path / "b.txt").write_text("b")
    assert sorted(CaptionedImageFolder(tmp_path, size=8)[i]["caption"] for i in range(2)) == ["a café", "b"]

    with open(tmp_path / "metadata.jsonl", "wb") as f:
        f.write(b'{"file_name": "a.png", "text": "ok"}\n')
        f.write('{"file_name": "b.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not valid UTF-8"):
        CaptionedImageFolder(tmp_path, caption_source="metadata")


def test_skip_summary_counts_skips_made_in_dataloader_workers(tmp_path):
    _folder_with_bad_files(tmp_path)
    ds = CaptionedImageFolder(tmp_path, size=8)
    assert ds.num_skipped == 0 and ds.skip_summary() == f"no images skipped (4 under {tmp_path.resolve()})"
    # The items are loaded in two worker processes only; the main process never reads a file itself.
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    captions = [batch["caption"][0] for batch in loader]
    assert sorted(captions) == ["good0", "good0", "good0", "good1"]
    assert ds.num_skipped == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_paths) == ["bad_garbage.png", "bad_truncated.png"]
    summary = ds.skip_summary()
    assert summary.startswith("skipped 2 of 4 images under ") and "\n" not in summary
    assert "bad_garbage.png, bad_truncated.png" in summary
    assert ds.skip_summary(show=1).endswith("bad_garbage.png (and 1 more)")


def test_training_logs_the_skip_count_and_ends_with_its_summary(tmp_path, caplog):
    import csv

    import pytorch_lightning as pl

    from ldm.training import build_dataloader, build_trainer

    class Fit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return (batch["image"].mean() - self.w) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = tmp_path / "data"
    _folder_with_bad_files(data)
    loader = build_dataloader({"target": "ldm.data.image_folder.CaptionedImageFolder",
                               "params": {"root": str(data), "size": 8}}, batch_size=2, shuffle=True)
    trainer = build_trainer(tmp_path / "run", max_steps=4, log_every=1, enable_progress_bar=False,
                            enable_model_summary=False, train_loader=loader)
    with caplog.at_level(logging.WARNING, logger="ldm.training"):
        trainer.fit(Fit(), loader)
    assert "training data: skipped 2 of 4 images" in caplog.text
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")))))
    assert [float(r["data/skipped_images"]) for r in rows if r.get("data/skipped_images")][-1] == 2
