"""Training data: caption conventions, skipped entries, transforms, the resumable sampler, cache specs.

`make_folder` is shared with the other training tests.
"""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hart.training.cache import CacheMismatchError, CacheSpec, check_cache
from hart.training.data import DataError, ImageCaptionFolder, scan_folder
from hart.training.sampler import ResumableBatchSampler

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "car", "bird"]


def make_folder(root: Path, n: int = 16, form: str = "jsonl", size=(72, 80)) -> Path:
    """`n` captioned RGB images (left half dark or bright by parity, noisy right half)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = size
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[:, : w // 2] = arr[:, : w // 2] // 4 + 100 * (i % 2)
        name = f"img{i:02d}.png"
        Image.fromarray(arr).save(root / name)
        caption = f"a {WORDS[i % 8]} {WORDS[(i * 3) % 8]}"
        rows.append((name, caption))
        if form == "txt":
            (root / name).with_suffix(".txt").write_text(caption + "\n")
    if form == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f, "text": c}) for f, c in rows))
    elif form == "csv":
        (root / "metadata.csv").write_text("file_name,caption\n" + "".join(f'{f},"{c}"\n' for f, c in rows))
    return root


@pytest.mark.parametrize("form", ["jsonl", "csv", "txt"])
def test_caption_forms(tmp_path, form):
    make_folder(tmp_path, n=4, form=form)
    entries, report = scan_folder(tmp_path, min_size=64)
    assert [e.name for e in entries] == [f"img{i:02d}.png" for i in range(4)]
    assert [e.caption for e in entries] == [f"a {WORDS[i]} {WORDS[(i * 3) % 8]}" for i in range(4)]
    assert report.total == 0


def test_bad_entries_are_skipped_counted_and_named(tmp_path, caplog):
    make_folder(tmp_path, n=6)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "corrupt.png").write_bytes(b"definitely not a png")
    Image.new("RGB", (32, 40)).save(tmp_path / "small.png")
    Image.new("RGB", (80, 80)).save(tmp_path / "uncaptioned.png")
    rows += [{"file_name": "corrupt.png", "text": "x"}, {"file_name": "small.png", "text": "tiny"},
             {"file_name": "gone.png", "text": "deleted"}, {"file_name": "uncaptioned.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, resolution=64)
    assert len(ds) == 6
    assert ds.report.counts == {"unreadable": 1, "smaller than 64px": 1, "listed but missing": 1, "missing caption": 1}
    assert ds.report.examples["unreadable"] == ["corrupt.png"]
    summary = ds.report.summary()
    assert summary.startswith("4 skipped") and "small.png" in summary and "uncaptioned.png" in summary
    assert "4 skipped" in caplog.text


def test_empty_or_unusable_folders_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        ImageCaptionFolder(tmp_path, resolution=64)
    with pytest.raises(DataError, match="not found"):
        ImageCaptionFolder(tmp_path / "missing", resolution=64)
    make_folder(tmp_path, n=2, form="none")  # images without any caption
    with pytest.raises(DataError, match="no usable image.*2 missing caption"):
        ImageCaptionFolder(tmp_path, resolution=64)
    (tmp_path / "metadata.csv").write_text("name,words\nimg00.png,a cat\n")
    with pytest.raises(DataError, match="file_name"):
        ImageCaptionFolder(tmp_path, resolution=64)


def test_image_failing_to_decode_is_replaced_and_reported(tmp_path):
    make_folder(tmp_path, n=3)
    data = (tmp_path / "img01.png").read_bytes()
    (tmp_path / "img01.png").write_bytes(data[: len(data) // 2])  # header fine, pixels truncated
    ds = ImageCaptionFolder(tmp_path, resolution=64)
    assert len(ds) == 3  # the scan reads headers only
    item = ds[(0, 1)]
    assert item["replaced"] == "img01.png" and item["caption"] == ds.entries[2].caption
    assert ds[(0, 0)]["replaced"] == ""


def test_transforms_are_deterministic_per_key(tmp_path):
    make_folder(tmp_path, n=2, size=(96, 64))
    center = ImageCaptionFolder(tmp_path, resolution=64)
    item = center[(0, 0)]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert torch.equal(center[(0, 0)]["pixel_values"], center[(5, 0)]["pixel_values"])
    rand = ImageCaptionFolder(tmp_path, resolution=64, crop="random", flip=True, seed=3)
    views = [rand[(e, 0)]["pixel_values"] for e in range(6)]
    assert torch.equal(views[0], rand[(0, 0)]["pixel_values"])  # same key, same view
    assert len({v.sum().item() for v in views}) > 1  # epochs differ
    with pytest.raises(ValueError, match="crop"):
        ImageCaptionFolder(tmp_path, resolution=64, crop="zoom")


def test_sampler_splits_global_batches_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    ranks = [take(ResumableBatchSampler(10, 2, world_size=2, rank=r, seed=1), 6) for r in range(2)]
    per_epoch = 10 // 4
    for b in range(per_epoch):  # within an epoch the two ranks' batches are disjoint
        a, c = {i for _, i in ranks[0][b]}, {i for _, i in ranks[1][b]}
        assert len(a | c) == 4
    assert ranks[0][per_epoch][0][0] == 1  # then a new epoch begins
    resumed = take(ResumableBatchSampler(10, 2, world_size=2, rank=1, seed=1, start=3), 3)
    assert resumed == ranks[1][3:6]
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        ResumableBatchSampler(3, 2, world_size=2)


def test_cache_spec_mismatch_names_every_difference(tmp_path):
    spec = CacheSpec("aa", "bb", "cc", "none", 300, (1, 2), 32, "center", False, "float32")
    info = {"format": 1, "spec": spec.to_dict(), "num_samples": 0, "shards": []}
    (tmp_path / "cache_info.json").write_text(json.dumps(info))
    assert check_cache(tmp_path, spec)["num_samples"] == 0
    other = CacheSpec("zz", "bb", "cc", "none", 300, (1, 2), 64, "center", False, "float32")
    with pytest.raises(CacheMismatchError, match="image_tokenizer.*resolution: cache has 32, this run needs 64"):
        check_cache(tmp_path, other)
    with pytest.raises(CacheMismatchError, match="not a HART training cache"):
        check_cache(tmp_path / "nothing", spec)
