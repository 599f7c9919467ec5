"""WebDataset shards: ``ldm make-shards`` writes them from a captioned folder, ``ShardDataset`` reads them back.

A shard sample must give the same tensor and caption as the same file read by ``CaptionedImageFolder``; the split
over ranks x DataLoader workers must read every sample exactly once per epoch; corrupt samples are skipped, logged
once and counted (also from worker processes); ``epoch_length`` fixes the samples per epoch per process.
"""

import collections
import io
import json
import logging
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import ldm.cli
import ldm.cli.make_shards as make_shards
from ldm.data.image_folder import CaptionedImageFolder
from ldm.data.shards import ShardDataset, read_shard, shuffle_buffered, slot_plan, worker_quota
from ldm.data.sources import SHARDS_TARGET, dataset_node
from ldm.util import instantiate_from_config
from webdataset import TarWriter

N_IMAGES = 12
KEYS = {f"{i:09d}" for i in range(N_IMAGES)}


def _noise(rng, h, w, channels):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.randint(0, 256, size=shape).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 noise images (png, jpg, jpeg, webp; RGB, grey, RGBA with transparent pixels; square and not), captions
    from metadata.jsonl and from sidecar .txt files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    specs = [  # (relative path, height, width, channels, PIL format, save options)
        ("a.png", 16, 16, 3, "PNG", {}), ("b.jpg", 16, 20, 3, "JPEG", {"quality": 90}),
        ("c.jpeg", 24, 16, 1, "JPEG", {}), ("d.webp", 16, 16, 3, "WEBP", {"lossless": True}),
        ("e.png", 18, 16, 4, "PNG", {}), ("sub/f.png", 16, 16, 1, "PNG", {}),
        ("sub/g.webp", 20, 20, 3, "WEBP", {"quality": 80}), ("h.png", 32, 16, 4, "PNG", {}),
        ("i.jpg", 16, 16, 1, "JPEG", {}), ("j.png", 16, 17, 3, "PNG", {}),
        ("sub/deeper/k.png", 16, 16, 3, "PNG", {}), ("l.webp", 17, 16, 4, "WEBP", {"lossless": True}),
    ]
    metadata = []
    for index, (name, h, w, channels, fmt, options) in enumerate(specs):
        array = _noise(rng, h, w, channels)
        if channels == 4:
            array[: h // 2, :, 3] = 0  # transparent top half: composited onto the white background
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format=fmt, **options)
        caption = f"image {index}: {name}" + (" café ☕" if index == 3 else "")
        if index % 2:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        else:
            metadata.append({"file_name": name, "text": caption})
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for entry in metadata:
            f.write(json.dumps(entry) + "\n")
    return root


def _make(folder, out, *extra):
    return make_shards.main(["--data", str(folder), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """``{shard_size: (out folder, brace pattern)}`` for 1, 5 and 12 samples a shard (12, 3 and 1 shards)."""
    written = {}
    for shard_size in (1, 5, 12):
        out = tmp_path_factory.mktemp(f"shards{shard_size}")
        written[shard_size] = (out, _make(folder, out, "--shard-size", str(shard_size)))
    return written


def _keys_through_loader(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [item["key"] for item in loader]


# ------------------------------------------------------------------------------------------------ make-shards


def test_make_shards_writes_original_bytes_captions_and_pattern(folder, shards):
    out, pattern = shards[5]
    assert pattern == os.path.join(str(out), "train-{000000..000002}.tar")
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # no .partial
    reference = CaptionedImageFolder(folder)
    members = {}
    for name in sorted(os.listdir(out)):
        with tarfile.open(out / name) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    assert len(members) == 3 * N_IMAGES
    for index, (path, caption) in enumerate(reference.samples):
        key = f"{index:09d}"
        ext = os.path.splitext(path)[1].lower().lstrip(".").replace("jpeg", "jpg")
        assert members[f"{key}.{ext}"] == open(path, "rb").read(), path  # not re-encoded
        assert members[f"{key}.txt"].decode("utf-8") == caption
        assert json.loads(members[f"{key}.json"]) == {
            "caption": caption, "file_name": os.path.relpath(path, reference.root).replace(os.sep, "/")}
    assert "000000002.jpg" in members  # c.jpeg


def test_dispatcher_and_script_path(folder, tmp_path, capsys):
    import scripts.make_shards

    assert scripts.make_shards.main is make_shards.main
    with pytest.raises(SystemExit) as stop:
        ldm.cli.main(["make-shards", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ldm make-shards")
    ldm.cli.main(["make-shards", "--data", str(folder), "--out", str(tmp_path / "s"), "--shard-size", "7",
                  "--prefix", "part", "--no-progress"])
    assert sorted(os.listdir(tmp_path / "s")) == ["part-000000.tar", "part-000001.tar"]
    assert f"--data '{tmp_path / 's' / 'part-{000000..000001}.tar'}'" in capsys.readouterr().out


def test_out_folder_with_shards_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        _make(folder, out)
    assert str(stop.value.code).startswith("error:") and "already holds 1 .tar" in stop.value.code
    assert f"--out {out.as_posix()}-2" in stop.value.code
    with pytest.raises(SystemExit) as stop:
        ldm.cli.main(["make-shards", "--data", str(folder), "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert sorted(os.listdir(out)) == ["old-000000.tar"]  # nothing written


def test_interrupted_shard_keeps_partial_name(folder, tmp_path, monkeypatch):
    calls = []

    def fail_on_seventh(*args):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk on fire")
        return real(*args)

    real = make_shards.sample_record
    monkeypatch.setattr(make_shards, "sample_record", fail_on_seventh)
    with pytest.raises(OSError, match="disk on fire"):
        _make(folder, tmp_path / "o", "--shard-size", "5")
    # the complete first shard has its name; the second, cut short, does not look like a shard
    assert sorted(os.listdir(tmp_path / "o")) == ["train-000000.tar", "train-000001.tar.partial"]


# ------------------------------------------------------------------------------------------------ reading


def test_shard_items_equal_folder_items(folder, shards):
    _, pattern = shards[5]
    reference = CaptionedImageFolder(folder, size=16, crop="center")
    dataset = ShardDataset(pattern, size=16, crop="center")
    items = {item["key"]: item for item in dataset}
    assert set(items) == KEYS
    for index in range(N_IMAGES):
        item, expected = items[f"{index:09d}"], reference[index]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
        assert torch.equal(item["image"], expected["image"]), reference.samples[index][0]
        assert item["caption"] == expected["caption"]
    # the white background shows in the transparent half of e.png (index 4): not the noise under it
    assert torch.equal(items["000000004"]["image"][:, :4], torch.ones(3, 4, 16))
    by_json = {item["key"]: item["caption"] for item in ShardDataset(pattern, size=8, caption_source="json")}
    assert by_json == {key: items[key]["caption"] for key in KEYS}
    assert {item["caption"] for item in ShardDataset(pattern, size=8, caption_source="none")} == {""}
    assert dataset.num_skipped == 0 and dataset.skip_summary().startswith("no samples skipped (12 read")


@pytest.mark.parametrize("form", ["pattern", "folder", "single tar"])
def test_data_path_forms_build_through_sources(shards, form):
    out, pattern = shards[5]
    path = {"pattern": pattern, "folder": str(out), "single tar": str(out / "train-000001.tar")}[form]
    node = dataset_node(path, size=8, crop="center")
    assert node["target"] == SHARDS_TARGET
    dataset = instantiate_from_config(node)
    assert isinstance(dataset, ShardDataset)
    keys = sorted(item["key"] for item in dataset)
    expected = sorted(KEYS) if form != "single tar" else [f"{i:09d}" for i in range(5, 10)]
    assert keys == expected


def test_missing_non_tar_and_pipe_shards_are_named(tmp_path, monkeypatch):
    (tmp_path / "nope-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shard\(s\) not found: .*nope-000001\.tar"):
        ShardDataset(str(tmp_path / "nope-{000000..000001}.tar"), size=8)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match=r"junk\.tar is not a readable tar file"):
        list(ShardDataset(str(junk), size=8))
    monkeypatch.delenv("LDM_ALLOW_PIPE_URLS", raising=False)
    with pytest.raises(ValueError, match="LDM_ALLOW_PIPE_URLS=1"):
        ShardDataset(f"pipe:cat {junk}", size=8)


# ------------------------------------------------------------------------------------------------ splitting


@pytest.mark.parametrize("num_shards", range(1, 10))
@pytest.mark.parametrize("num_slots", range(1, 6))
def test_slot_plan_reads_every_sample_once(num_shards, num_slots):
    sizes = [3 + (i % 4) for i in range(num_shards)]  # shards of unequal length
    seen = collections.Counter()
    for slot in range(num_slots):
        positions, every, offset = slot_plan(num_shards, slot, num_slots)
        stream = [(shard, j) for shard in positions for j in range(sizes[shard])]
        seen.update(sample for index, sample in enumerate(stream) if index % every == offset)
    assert seen == collections.Counter((shard, j) for shard in range(num_shards) for j in range(sizes[shard]))


@pytest.mark.parametrize("shard_size", [1, 5, 12])  # 12, 3 and 1 shards for 4 slots
@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_two_ranks_two_workers_read_every_key_once(shards, shard_size, shuffle_buffer):
    _, pattern = shards[shard_size]
    per_rank = []
    for rank in range(2):
        dataset = ShardDataset(pattern, size=8, rank=rank, world_size=2, shuffle_buffer=shuffle_buffer, seed=3)
        dataset.set_epoch(1)
        per_rank.append(_keys_through_loader(dataset, num_workers=2))
    counts = collections.Counter(per_rank[0] + per_rank[1])
    assert set(counts) == KEYS and set(counts.values()) == {1}, counts
    assert all(per_rank), per_rank  # both ranks read something


def test_set_epoch_changes_the_shuffled_order_only(shards):
    _, pattern = shards[1]
    dataset = ShardDataset(pattern, size=8, shuffle_buffer=4, seed=0)
    first = [item["key"] for item in dataset]
    assert [item["key"] for item in dataset] == first  # same epoch, same order
    dataset.set_epoch(1)
    second = [item["key"] for item in dataset]
    assert second != first and sorted(second) == sorted(first) == sorted(KEYS)
    assert [item["key"] for item in ShardDataset(pattern, size=8)] == sorted(KEYS)  # no shuffle: file order


def test_shuffle_buffer_is_a_permutation():
    items = list(range(50))
    out = list(shuffle_buffered(items, 8, random.Random(0)))
    assert sorted(out) == items and out != items
    assert list(shuffle_buffered(items, 0, random.Random(0))) == items


# ------------------------------------------------------------------------------------------------ epoch_length


def test_epoch_length_stops_and_repeats(shards):
    _, pattern = shards[5]
    with pytest.raises(TypeError, match="epoch_length"):
        len(ShardDataset(pattern, size=8))
    short = ShardDataset(pattern, size=8, epoch_length=7)
    assert len(short) == 7
    keys = [item["key"] for item in short]
    assert len(keys) == len(set(keys)) == 7
    long = ShardDataset(pattern, size=8, epoch_length=30)
    counts = collections.Counter(item["key"] for item in long)
    assert sum(counts.values()) == 30 and set(counts) == KEYS and min(counts.values()) >= 2
    assert len(_keys_through_loader(ShardDataset(pattern, size=8, epoch_length=7), num_workers=2)) == 7
    for rank in range(2):  # each rank its own epoch_length, though rank 1's share is smaller
        ranked = ShardDataset(pattern, size=8, epoch_length=5, rank=rank, world_size=2)
        assert len(_keys_through_loader(ranked, num_workers=2)) == 5
    assert [worker_quota(7, w, 2) for w in range(2)] == [4, 3]


# ------------------------------------------------------------------------------------------------ corrupt samples


def _png_bytes(seed, side=16):
    buffer = io.BytesIO()
    Image.fromarray(_noise(np.random.RandomState(seed), side, side, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def damaged(tmp_path):
    """Two shards: one with four bad samples among three good ones, one cut off in the middle of its 2nd image.
    Returns (urls, good keys, skipped names)."""
    bad = str(tmp_path / "bad-000000.tar")
    good_png = _png_bytes(0)
    with TarWriter(bad, encoder=False) as writer:
        writer.write({"__key__": "good0", "png": good_png, "txt": b"fine"})
        writer.write({"__key__": "truncated", "png": good_png[: len(good_png) // 2], "txt": b"cut"})
        writer.write({"__key__": "noimage", "txt": b"caption without a picture"})
        writer.write({"__key__": "badjson", "jpg": _png_bytes(1), "json": b"{not json"})
        writer.write({"__key__": "good1", "webp": _png_bytes(2), "json": b'{"text": "from json"}'})
        writer.write({"__key__": "badutf8", "png": good_png, "txt": b"\xff\xfe\xfa"})
        writer.write({"__key__": "good2", "png": _png_bytes(3), "txt": b"fine too"})
    cut = str(tmp_path / "bad-000001.tar")
    with TarWriter(cut, encoder=False) as writer:
        for index in range(3):
            writer.write({"__key__": f"cut{index}", "png": _png_bytes(10 + index, side=48), "txt": b"x"})
    with tarfile.open(cut) as tar:
        png = next(info for info in tar.getmembers() if info.name == "cut1.png")
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[: png.offset_data + png.size // 2])
    skipped = {"bad-000000.tar:truncated", "bad-000000.tar:noimage", "bad-000000.tar:badjson",
               "bad-000000.tar:badutf8", "bad-000001.tar:cut1"}
    return [bad, cut], {"good0", "good1", "good2", "cut0"}, skipped


def test_corrupt_samples_are_skipped_logged_once_and_counted(damaged, caplog):
    urls, good, skipped = damaged
    dataset = ShardDataset(urls, size=8)
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        assert {item["key"] for item in dataset} == good
    assert dataset.num_skipped == len(skipped) and set(dataset.skipped_keys) == skipped
    assert len(caplog.records) == len(skipped)
    assert "cut off or damaged" in caplog.text and "no image member" in caplog.text
    summary = dataset.skip_summary(show=2)
    assert summary.startswith(f"skipped {len(skipped)} samples") and "(and 3 more)" in summary
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        assert {item["key"] for item in dataset} == good  # a second epoch: same samples, nothing new to report
    assert dataset.num_skipped == len(skipped) and not caplog.records


def test_skips_in_dataloader_workers_reach_the_main_process(damaged):
    urls, good, skipped = damaged
    dataset = ShardDataset(urls, size=8)
    assert set(_keys_through_loader(dataset, num_workers=2)) == good
    assert dataset.num_skipped == len(skipped) and set(dataset.skipped_keys) == skipped
    assert "4 read so far" in dataset.skip_summary()


def test_read_shard_groups_members_and_marks_the_cut(damaged):
    urls, _, _ = damaged
    samples = list(read_shard(urls[1]))
    assert [s["__key__"] for s in samples] == ["cut0", "cut1"]
    assert "__error__" not in samples[0] and set(samples[0]) == {"__key__", "__url__", "png", "txt"}
    assert "cut off or damaged" in samples[1]["__error__"]
