"""A folder of captioned images as a training set, with the usual caption conventions.

Captions come from the first of these found in the folder:
1. `metadata.jsonl`: one JSON object per line with `file_name` and `text` (the Hugging Face
   imagefolder convention; `caption` is accepted for `text`);
2. `metadata.csv`: a header row naming `file_name` and `caption` (or `text`);
3. a `.txt` file beside each image (`cat.png` + `cat.txt`).

Bad entries never stop an epoch: a `metadata.jsonl` line that is not valid JSON (named by its line
number), an image that cannot be read, has no caption or is smaller than `min_size` is skipped when
the folder is scanned, counted by reason, and the first few names are reported (`SkipReport`). An
image that passes the scan but fails to decode later (a truncated file) is replaced by the next
readable sample and reported the same way.

Items are addressed by `(epoch, index)` keys (see `sampler.py`): random crops and flips are drawn from
a generator seeded by `(seed, epoch, index)`, so an item is the same whichever worker loads it and
whenever a run resumes.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CROPS = ("center", "random")


class DataError(ValueError):
    """A data folder that cannot be trained on (empty, unreadable metadata, nothing usable)."""


@dataclass
class SkipReport:
    """Entries left out, counted by reason (each name once: an image that fails to decode in every epoch
    is one image), with the first `keep` names of each reason."""

    counts: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    keep: int = 5
    seen: Set[Tuple[str, str]] = field(default_factory=set, repr=False)  # (reason, name) pairs counted here

    def add(self, reason: str, name: str) -> None:
        if (reason, name) in self.seen:
            return
        self.seen.add((reason, name))
        self.counts[reason] = self.counts.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < self.keep:
            names.append(name)

    def merge(self, other: "SkipReport") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            names = self.examples.setdefault(reason, [])
            names.extend(x for x in other.examples.get(reason, []) if x not in names)
            del names[self.keep:]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no images skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in sorted(self.counts.items())]
        return f"{self.total} skipped: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": dict(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        return cls(dict(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()})


@dataclass(frozen=True)
class Entry:
    path: Path
    name: str  # path relative to the folder, '/'-separated
    caption: str


def _read_jsonl(path: Path, report: Optional[SkipReport] = None) -> Dict[str, str]:
    """Captions of `metadata.jsonl`; a line that is not valid JSON is skipped (logged with its line
    number and counted in `report` as "bad metadata line")."""
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            logger.warning("%s, line %d: not valid JSON (%s); line skipped", path, n, e)
            if report is not None:
                report.add("bad metadata line", f"{path.name}:{n}")
            continue
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{path}, line {n}: every line needs a 'file_name' field")
        text = row.get("text", row.get("caption"))
        captions[str(row["file_name"])] = text if isinstance(text, str) else ""
    return captions


def _read_csv(path: Path) -> Dict[str, str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = "caption" if "caption" in fields else "text" if "text" in fields else None
        if "file_name" not in fields or column is None:
            raise DataError(f"{path}: the header must name 'file_name' and 'caption' (or 'text'), got {fields}")
        return {row["file_name"]: row[column] or "" for row in reader}


def read_captions(root: Path, report: Optional[SkipReport] = None) -> Tuple[Optional[Dict[str, str]], str]:
    """(file name -> caption, source description); None when captions sit in `.txt` files."""
    for name, read in (("metadata.jsonl", lambda p: _read_jsonl(p, report)), ("metadata.csv", _read_csv)):
        if (root / name).is_file():
            try:
                return read(root / name), name
            except UnicodeDecodeError as e:
                raise DataError(f"{root / name} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    return None, ".txt files"


def scan_folder(root, min_size: int, require_captions: bool = True) -> Tuple[List[Entry], SkipReport]:
    """Usable entries of an image folder (sorted by name) and what was skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    report, entries = SkipReport(), []
    captions, source = read_captions(root, report) if require_captions else ({}, "none")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    names = {p.relative_to(root).as_posix() for p in files}
    for name in sorted(set(captions or {}) - names):
        report.add("listed but missing", name)
    for path in files:
        name = path.relative_to(root).as_posix()
        caption = ""
        if require_captions:
            if captions is None:
                txt = path.with_suffix(".txt")
                try:
                    caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
                except UnicodeDecodeError as e:
                    raise DataError(f"{txt} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
            else:
                caption = (captions.get(name) or "").strip()
            if not caption:
                report.add("missing caption", name)
                continue
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception:  # PIL raises many types for corrupt or unsupported files
            report.add("unreadable", name)
            continue
        if min(w, h) < min_size:
            report.add(f"smaller than {min_size}px", name)
            continue
        entries.append(Entry(path, name, caption))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    if not entries:
        raise DataError(f"no usable image in {root} (captions from {source}): {report.summary()}")
    if report.total:
        logger.warning("%s: %s", root, report.summary())
    return entries, report


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's augmentations."""
    return np.random.default_rng([seed, epoch, index])


def resize_crop(img: Image.Image, resolution: int, crop: str, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """RGB image -> `(3, R, R)` float32 in [-1, 1]: shorter side to R (bicubic), then a crop.

    Camera orientation tags are applied first, so photos are trained the way viewers show them.
    """
    img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    w, h = size
    if crop == "random":
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr_HWC = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr_HWC).permute(2, 0, 1).contiguous()


class ImageCaptionFolder(torch.utils.data.Dataset):
    """`dataset[(epoch, index)]` -> `{"pixel_values", "caption", "index", "replaced"}`.

    `replaced` names the image that failed to decode when this item is its stand-in ("" otherwise).
    """

    def __init__(self, root, resolution: int, *, crop: str = "center", flip: bool = False, seed: int = 0,
                 min_size: Optional[int] = None, require_captions: bool = True):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.root, self.resolution, self.crop, self.flip, self.seed = Path(root), resolution, crop, flip, seed
        self.entries, self.report = scan_folder(root, resolution if min_size is None else min_size, require_captions)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        epoch, index = key
        replaced = ""
        for attempt in range(len(self.entries)):
            entry = self.entries[(index + attempt) % len(self.entries)]
            try:
                with Image.open(entry.path) as im:
                    im.load()
                    pixels = resize_crop(im, self.resolution, self.crop, self.flip, sample_rng(self.seed, epoch, index))
                return {"pixel_values": pixels, "caption": entry.caption, "index": index, "replaced": replaced}
            except Exception:  # decoding errors of a file that looked fine at scan time
                logger.warning("cannot decode %s; using the next image instead", entry.name)
                replaced = replaced or entry.name
        raise DataError(f"no image in {self.root} can be decoded")
