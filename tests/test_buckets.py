"""Aspect-ratio buckets: the bucket list, the assignment, the batch sampler, and CaptionedImageFolder(buckets=True)."""

import io
import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from ldm.data.image_folder import CaptionedImageFolder, resize_and_crop

# --- make_buckets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, step", [(512, 64), (256, 32), (32, 8), (100, 16), (64, 64)])
def test_make_buckets_properties(resolution, step):
    buckets = make_buckets(resolution, step)
    assert len(set(buckets)) == len(buckets)
    assert all(w % step == 0 and h % step == 0 and w > 0 and h > 0 for w, h in buckets)
    assert all(w * h <= resolution ** 2 for w, h in buckets)
    side = resolution // step * step
    assert (side, side) in buckets
    assert set(buckets) == {(h, w) for w, h in buckets}  # as many landscape shapes as portrait ones
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)  # portrait first, landscape last
    assert all(ratio != 1 for (w, h), ratio in zip(buckets, ratios) if w != h)


def test_make_buckets_matches_kohya_at_512():
    # sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), sorted by aspect ratio.
    assert make_buckets(512) == [
        (256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_make_buckets_bounds_and_errors():
    bounded = make_buckets(512, 64, min_size=384, max_size=768)
    assert all(384 <= side <= 768 for wh in bounded for side in wh)
    assert (512, 512) in bounded and len(bounded) < len(make_buckets(512))
    assert make_buckets(64) == [(64, 64)]  # at a 64-pixel budget a 64 step leaves only the square
    with pytest.raises(ValueError, match="step 64 is larger than the resolution 32"):
        make_buckets(32, 64)
    with pytest.raises(ValueError, match="min bucket size 100 is not a multiple of the bucket step 64"):
        make_buckets(512, 64, min_size=100)
    with pytest.raises(ValueError, match=r"min 576 <= 512"):
        make_buckets(512, 64, min_size=576)
    with pytest.raises(ValueError, match="bucket step must be a positive integer, got 'x'"):
        make_buckets(512, "x")


# --- assign_bucket ------------------------------------------------------------------------------------------------


def test_assign_picks_the_nearest_aspect_ratio():
    buckets = make_buckets(512)
    assert buckets[assign_bucket(512, 512, buckets)] == (512, 512)
    assert buckets[assign_bucket(3000, 3000, buckets)] == (512, 512)
    assert buckets[assign_bucket(1920, 1080, buckets)] == (640, 384)
    assert buckets[assign_bucket(1080, 1920, buckets)] == (384, 640)
    assert buckets[assign_bucket(10_000, 10, buckets)] == (1024, 256)  # beyond the widest: the widest
    for width, height in [(1920, 1080), (600, 800), (333, 1000), (1234, 987), (50, 49)]:
        errors = [abs(math.log(w / h) - math.log(width / height)) for w, h in buckets]
        assert errors[assign_bucket(width, height, buckets)] == min(errors)


def test_assign_compares_log_ratios():
    # 1.1 is nearer 0.5 than 2.0 as a plain difference, but a 1.1:1 picture is landscape: log ratios say 2:1.
    assert assign_bucket(110, 100, [(1, 2), (2, 1)]) == 1
    with pytest.raises(ValueError, match="0x5"):
        assign_bucket(0, 5, [(1, 1)])


def test_resize_and_crop_square_is_the_bucket_crop_of_a_square():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    square = np.asarray(resize_and_crop(image, 16))
    assert np.array_equal(square, np.asarray(resize_and_crop(image, (16, 16))))
    assert resize_and_crop(image, (24, 8)).size == (24, 8)
    assert resize_and_crop(image, (8, 24), crop="random").size == (8, 24)


# --- BucketBatchSampler -------------------------------------------------------------------------------------------

# 8 + 6 + 4 + 3 samples in buckets 5, 0, 2, 9 (interleaved, as a folder's sorted files would be)
IDS = [5, 0, 2, 5, 9, 0, 5, 2, 5, 0, 5, 2, 9, 0, 5, 5, 0, 2, 9, 0, 5]


def test_batches_come_from_one_bucket():
    for drop_last in (True, False):
        sampler = BucketBatchSampler(IDS, batch_size=2, seed=3, drop_last=drop_last)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.num_batches
        assert all(len({IDS[i] for i in batch}) == 1 for batch in batches)
        seen = Counter(i for batch in batches for i in batch)
        assert max(seen.values()) == 1
        if drop_last:
            # 8//2 + 6//2 + 4//2 + 3//2: every batch full, one sample of the odd bucket left out
            assert len(batches) == 10 and all(len(b) == 2 for b in batches) and len(seen) == len(IDS) - 1
        else:
            assert len(batches) == 11 and set(seen) == set(range(len(IDS)))


def test_epoch_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = BucketBatchSampler(IDS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = order(0, 1)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream training draws from is untouched
    torch.manual_seed(456)
    assert order(0, 1) == first
    assert order(0, 2) != first and order(1, 1) != first
    assert sorted(map(sorted, order(0, 2))) == sorted(map(sorted, order(0, 2)))
    unshuffled = BucketBatchSampler(IDS, batch_size=2, shuffle=False)
    assert list(unshuffled)[0] == [1, 5]  # bucket 0's first two indices, in order


def test_two_ranks_split_the_global_order():
    ids = [0] * 8 + [1] * 4 + [2] * 4  # 8 batches of 2: an even split, so the ranks cover the whole epoch
    ranks = []
    for rank in range(2):
        sampler = BucketBatchSampler(ids, batch_size=2, seed=7)
        sampler.set_distributed(rank, 2)
        sampler.set_epoch(4)
        ranks.append(list(sampler))
        assert len(sampler) == 4 == len(ranks[-1])
    flat = [set(i for b in batches for i in b) for batches in ranks]
    assert not flat[0] & flat[1] and flat[0] | flat[1] == set(range(len(ids)))
    global_order = BucketBatchSampler(ids, batch_size=2, seed=7).batches(4)
    assert [b for pair in zip(*ranks) for b in pair] == global_order

    odd = BucketBatchSampler(IDS, batch_size=2)  # 10 batches over 3 ranks: 3 each, the last one dropped
    odd.set_distributed(2, 3)
    assert len(odd) == 3 == len(list(odd))
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        odd.set_distributed(2, 2)
    with pytest.raises(ValueError, match="10 item\(s\) of the epoch cannot be split over 11"):
        odd.set_distributed(0, 11)


def test_resume_continues_the_same_order():
    batch_size, epoch = 2, 3
    full = BucketBatchSampler(IDS, batch_size, seed=1)
    full.set_epoch(epoch)
    whole = list(full)
    for done in (0, 1, 4, len(whole)):
        resumed = BucketBatchSampler(IDS, batch_size, seed=1)
        resumed.set_epoch(epoch)
        resumed.resume(epoch, done * batch_size)
        assert list(resumed) == whole[done:]
        assert list(resumed) == whole  # the resume applies to one pass only
    # An offset off the batch grid rounds down: samples are trained twice rather than skipped.
    resumed.resume(epoch, 3 * batch_size + 1)
    assert list(resumed) == whole[3:]
    # A resume for another epoch leaves this one whole.
    resumed.resume(epoch + 1, 2 * batch_size)
    assert list(resumed) == whole

    # Two ranks stopped after 2 batches each: offset = 2 * batch_size * 2; each continues its own order, and one
    # process resuming that checkpoint continues the global order after those 4 batches.
    for rank in range(2):
        straight, resumed = (BucketBatchSampler(IDS, batch_size, seed=1) for _ in range(2))
        for sampler in (straight, resumed):
            sampler.set_distributed(rank, 2)
            sampler.set_epoch(epoch)
        resumed.resume(epoch, 2 * batch_size * 2)
        assert list(resumed) == list(straight)[2:]
    single = BucketBatchSampler(IDS, batch_size, seed=1)
    single.set_epoch(epoch)
    single.resume(epoch, 2 * batch_size * 2)
    assert list(single) == whole[4:]
    assert single.num_samples == 20
    single.resume(epoch, single.num_samples)  # the end of the epoch: nothing left of it
    assert list(single) == []
    with pytest.raises(ValueError, match="resume offset 21 is outside the epoch of 20 samples"):
        single.resume(epoch, 21)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match=r"no bucket holds a full batch of 4 \(the largest holds 3 of 5"):
        BucketBatchSampler([0, 0, 0, 1, 1], batch_size=4)
    assert len(BucketBatchSampler([0, 0, 0, 1, 1], batch_size=4, drop_last=False)) == 2
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        BucketBatchSampler([0], batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], batch_size=1)


def test_lightning_reaches_set_epoch_through_the_loader():
    # Lightning calls set_epoch on loader.sampler and loader.batch_sampler.sampler, not on the batch sampler.
    from lightning_fabric.utilities.data import _set_sampler_epoch

    sampler = BucketBatchSampler(IDS, batch_size=2)
    loader = torch.utils.data.DataLoader(list(range(len(IDS))), batch_sampler=sampler)
    _set_sampler_epoch(loader, 6)
    assert sampler.epoch == 6
    assert [b.tolist() for b in loader] == sampler.batches(6)
    assert len(loader) == len(sampler)


# --- CaptionedImageFolder(buckets=True) ---------------------------------------------------------------------------

SIZE, STEP = 32, 8  # buckets (w, h): 16x64 ... 24x40, 32x32, 40x24 ... 64x16
WIDE, TALL, SQUARE = (40, 24), (24, 40), (32, 32)
STRIPES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def _rgb(rgb):
    return torch.tensor(rgb, dtype=torch.float64) / 127.5 - 1


def _mixed_folder(root):
    """Nine images of mixed sizes and modes, three per bucket: ``{stem: (displayed (w, h), bucket, colour)}``
    (colour ``None``: the stripes)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}

    def add(stem, image, displayed, bucket, colour, fmt="png", **kwargs):
        image.save(root / f"{stem}.{fmt}", **kwargs)
        (root / f"{stem}.txt").write_text(stem)
        files[stem] = (displayed, bucket, colour)

    stripes = np.zeros((20, 40, 3), np.uint8)  # four vertical stripes 10 px wide
    for k, rgb in enumerate(STRIPES):
        stripes[:, 10 * k:10 * (k + 1)] = rgb
    add("wide_rgb_stripes", Image.fromarray(stripes), (40, 20), WIDE, None)
    add("wide_grey16", Image.fromarray(np.full((24, 48), 32768, np.uint16)), (48, 24), WIDE, (128, 128, 128))
    add("wide_palette", Image.new("RGB", (40, 20), (0, 255, 255)).convert("P"), (40, 20), WIDE, (0, 255, 255))
    add("tall_grey", Image.new("L", (20, 40), 64), (20, 40), TALL, (64, 64, 64))
    add("tall_rgba", Image.new("RGBA", (20, 40), (255, 0, 255, 255)), (20, 40), TALL, (255, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (a phone held upright)
    add("tall_exif_rotated", Image.new("RGB", (40, 20), (255, 128, 0)), (20, 40), TALL, (255, 128, 0),
        fmt="jpg", quality=100, exif=exif)
    add("square_rgba", Image.new("RGBA", (32, 32), (0, 0, 255, 255)), (32, 32), SQUARE, (0, 0, 255))
    add("square_grey", Image.new("L", (32, 32), 200), (32, 32), SQUARE, (200, 200, 200))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 128, 0] + [0, 0, 0] * 255)
    add("square_palette", palette, (32, 32), SQUARE, (0, 128, 0))
    return files


def test_bucketed_folder_through_a_dataloader(tmp_path):
    files = _mixed_folder(tmp_path)
    ds = CaptionedImageFolder(tmp_path, size=SIZE, buckets=True, bucket_step=STEP)
    assert ds.bucket_sizes == make_buckets(SIZE, STEP) and len(ds.bucket_ids) == len(ds) == 9
    stems = [path.rsplit("/", 1)[-1].rsplit(".", 1)[0] for path, _ in ds.samples]
    assert {stem: ds.bucket_sizes[b] for stem, b in zip(stems, ds.bucket_ids)} == {
        stem: bucket for stem, (_, bucket, _) in files.items()}
    index_of = {stem: i for i, stem in enumerate(stems)}

    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0, drop_last=False)
    seen = []
    for batch in torch.utils.data.DataLoader(ds, batch_sampler=sampler):
        images, captions = batch["image"], batch["caption"]
        width, height = ds.bucket_sizes[ds.bucket_ids[index_of[captions[0]]]]
        assert images.shape == (len(captions), 3, height, width) and images.dtype == torch.float32
        for image, stem in zip(images, captions):
            (source_w, source_h), bucket, colour = files[stem]
            assert ds.bucket_sizes[ds.bucket_ids[index_of[stem]]] == (width, height)
            # the item keeps (about) the picture's shape: within 30% in aspect ratio, where a square is 2x off
            assert abs(math.log((width / height) / (source_w / source_h))) < math.log(1.3), stem
            if colour is not None:  # grey, 16-bit grey, palette, RGBA and the EXIF-rotated JPEG decode right
                error = (image.double() - _rgb(colour)[:, None, None]).abs().max()
                assert error < 0.03, (stem, error)
        seen.extend(captions)
    assert sorted(seen) == sorted(files)  # each image exactly once in the epoch


def test_bucket_crop_keeps_the_whole_width(tmp_path):
    # 40x20 stripes -> covers 40x24 at scale 1.2 (48x24), centre crop drops 4 px a side: all four stripes stay,
    # with boundaries at 8, 20 and 32 (a square crop would keep only the middle two).
    _mixed_folder(tmp_path)
    ds = CaptionedImageFolder(tmp_path, size=SIZE, buckets=True, bucket_step=STEP)
    index = next(i for i, (_, caption) in enumerate(ds.samples) if caption == "wide_rgb_stripes")
    image = ds[index]["image"].double()
    assert image.shape == (3, 24, 40)
    for column, rgb in zip((3, 14, 26, 36), STRIPES):
        assert (image[:, :, column] - _rgb(rgb)[:, None]).abs().max() < 0.05, (column, rgb)


def _png(w, h):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_corrupt_images_are_replaced_within_their_bucket(tmp_path, caplog):
    # in file order, the image after a_tall_bad is a wide one: a plain wrap-around would not keep the bucket
    files = {"a_tall_bad": _png(20, 40)[:300], "b_wide": _png(40, 20), "c_wide": _png(40, 20),
             "d_tall_good": _png(20, 40), "e_square_bad": _png(32, 32)[:300], "unreadable": b"not an image"}
    for stem, data in files.items():
        (tmp_path / f"{stem}.png").write_bytes(data)
        (tmp_path / f"{stem}.txt").write_text(stem)
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        ds = CaptionedImageFolder(tmp_path, size=SIZE, buckets=True, bucket_step=STEP)
    # the header of "unreadable" cannot be read: skipped at construction, as verify=True would
    assert len(ds) == 5 and ds.num_skipped == 1 and "unreadable.png" in caplog.text
    captions = [caption for _, caption in ds.samples]
    items = {caption: ds[i] for i, caption in enumerate(captions)}
    # a truncated file has a readable header, so it fails at load time: the next good image of its bucket
    assert items["a_tall_bad"]["caption"] == "d_tall_good" and items["a_tall_bad"]["image"].shape == (3, 40, 24)
    # a bucket with no good image left: another image, cropped to that bucket's shape, so the batch still stacks
    assert items["e_square_bad"]["image"].shape == (3, 32, 32)
    assert items["e_square_bad"]["caption"] in ("b_wide", "c_wide", "d_tall_good")
    assert ds.num_skipped == 3
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_paths) == ["a_tall_bad.png", "e_square_bad.png",
                                                                       "unreadable.png"]
    batches = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds.bucket_ids, 2, drop_last=False))
    assert sum(len(batch["caption"]) for batch in batches) == 5


def test_bucket_arguments_are_checked(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match=r"bucket_step=64.*step 64 is larger than the resolution 32"):
        CaptionedImageFolder(tmp_path, size=32, buckets=True)
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no image header under .* could be read"):
        CaptionedImageFolder(tmp_path, size=32, buckets=True, bucket_step=8)
    plain = CaptionedImageFolder(tmp_path, size=32)  # buckets off: nothing read at construction, as before
    assert plain.bucket_ids == [] and "buckets" not in repr(plain)
