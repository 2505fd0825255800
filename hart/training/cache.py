"""Pre-encoded training data: text features, token indices and residuals in safetensors shards.

With a cache, training loads neither the text encoder nor the image encoder for its batches. The
cache records what it was made with (`CacheSpec`: fingerprints of the image tokenizer, the text
encoder and its tokenizer, the system prompt, text length, scales, resolution, crop, flips, feature
dtype) and refuses to be read by a run that would have made it differently.

Layout: `cache_info.json` plus `shard-r{rank}-{k}.safetensors`, each holding `index`, `variant`
(1 = horizontally flipped), `features`, `mask`, `tokens` and `residual` for up to `shard_size`
examples. With flips, every image is stored twice and the variant is drawn per item with the same
generator live training uses, so cached and live runs see the same flips.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hart.training.data import ImageCaptionFolder, SkipReport, sample_rng
from hart.training.encoding import encode_examples, encode_images

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
CACHE_FORMAT = 1
FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheMismatchError(ValueError):
    """A cache made with other models or settings than the run that wants to read it."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a model's parameter names, shapes and a strided sample of their values."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def text_tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    desc = [type(tokenizer).__name__, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"), vocab]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Everything that decides the cached tensors."""

    image_tokenizer: str
    text_encoder: str
    text_tokenizer: str
    system_prompt: str  # sha256 prefix of the text, or "none"
    max_length: int
    patch_nums: Tuple[int, ...]
    resolution: int
    crop: str
    flip: bool
    features_dtype: str

    @classmethod
    def create(cls, vae, text_encoder, text_tokenizer, *, system_prompt: Optional[str], max_length: int,
               patch_nums, resolution: int, crop: str, flip: bool, features_dtype: str) -> "CacheSpec":
        if crop != "center":
            raise ValueError("a cache stores one crop per image: use crop='center' with a cache (random crops need live encoding)")
        if features_dtype not in FEATURE_DTYPES:
            raise ValueError(f"features_dtype must be one of {list(FEATURE_DTYPES)}, got {features_dtype!r}")
        prompt = hashlib.sha256(system_prompt.encode()).hexdigest()[:16] if system_prompt else "none"
        return cls(module_fingerprint(vae), module_fingerprint(text_encoder), text_tokenizer_fingerprint(text_tokenizer),
                   prompt, int(max_length), tuple(int(p) for p in patch_nums), int(resolution), crop, bool(flip), features_dtype)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    def mismatches(self, other: "CacheSpec") -> List[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: cache has {a[k]!r}, this run needs {b[k]!r}" for k in a if a[k] != b[k]]


def read_cache_info(cache_dir) -> dict:
    path = Path(cache_dir) / CACHE_INFO
    if not path.is_file():
        raise CacheMismatchError(f"{cache_dir} is not a HART training cache (no {CACHE_INFO})")
    info = json.loads(path.read_text())
    if info.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{cache_dir}: cache format {info.get('format')} is not {CACHE_FORMAT}; rebuild it")
    return info


def check_cache(cache_dir, spec: CacheSpec) -> dict:
    """The cache's info, or a `CacheMismatchError` naming every setting that differs."""
    info = read_cache_info(cache_dir)
    stored = dict(info["spec"], patch_nums=tuple(info["spec"]["patch_nums"]))
    diffs = CacheSpec(**stored).mismatches(spec)
    if diffs:
        raise CacheMismatchError(f"the cache in {cache_dir} was made for other models or settings: " + "; ".join(diffs)
                                 + ". Rebuild it in another folder (or delete it).")
    return info


def build_cache(cache_dir, dataset: ImageCaptionFolder, spec: CacheSpec, vae, text_encoder, text_tokenizer, *,
                system_prompt: Optional[str], state, batch_size: int = 8, shard_size: int = 1024) -> None:
    """Encode `dataset` (center crop, no flip: flips are stored as a second variant) into `cache_dir`.

    `state` is an `accelerate` Accelerator or PartialState: each process encodes its share into a
    common temporary folder, which the main process renames to `cache_dir` when all are done.
    """
    cache_dir = Path(cache_dir)
    tmp = cache_dir.with_name(cache_dir.name + ".partial")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    dtype = FEATURE_DTYPES[spec.features_dtype]
    mine = list(range(state.process_index, len(dataset), state.num_processes))
    report, rows, shard = SkipReport(), [], 0

    def flush():
        nonlocal rows, shard
        if rows:
            tensors = {k: torch.cat([r[k] for r in rows]).contiguous() for k in rows[0]}
            save_file(tensors, str(tmp / f"shard-r{state.process_index:03d}-{shard:05d}.safetensors"))
            rows, shard = [], shard + 1

    for lo in tqdm(range(0, len(mine), batch_size), desc="caching", disable=not state.is_main_process):
        items = [dataset[(0, i)] for i in mine[lo:lo + batch_size]]
        for item in items:
            if item["replaced"]:
                report.add("unreadable", item["replaced"])
        pixels = torch.stack([it["pixel_values"] for it in items])
        index = torch.tensor([it["index"] for it in items])
        enc = encode_examples(pixels, [it["caption"] for it in items], vae, text_encoder, text_tokenizer,
                              patch_nums=spec.patch_nums, max_length=spec.max_length, system_prompt=system_prompt)
        for variant in range(2 if spec.flip else 1):
            if variant:  # the mirrored image, same caption features
                enc["tokens"], enc["residual"] = encode_images(pixels.flip(-1), vae, spec.patch_nums)
            rows.append({"index": index, "variant": torch.full_like(index, variant),
                         "features": enc["features"].to("cpu", dtype), "mask": enc["mask"].cpu(),
                         "tokens": enc["tokens"].to("cpu", torch.int32), "residual": enc["residual"].cpu()})
            if sum(len(r["index"]) for r in rows) >= shard_size:
                flush()
    flush()
    (tmp / f"skipped-r{state.process_index:03d}.json").write_text(json.dumps(report.to_dict()))
    state.wait_for_everyone()
    if state.is_main_process:
        report = SkipReport.from_dict(dataset.report.to_dict())
        for part in sorted(tmp.glob("skipped-r*.json")):
            report.merge(SkipReport.from_dict(json.loads(part.read_text())))
            part.unlink()
        info = {"format": CACHE_FORMAT, "spec": spec.to_dict(), "num_samples": len(dataset),
                "shards": sorted(p.name for p in tmp.glob("shard-*.safetensors")),
                "names": [e.name for e in dataset.entries],
                "captions": [e.caption for e in dataset.entries], "skipped": report.to_dict()}
        (tmp / CACHE_INFO).write_text(json.dumps(info, indent=1))
        tmp.rename(cache_dir)
        logger.info("cached %d images in %s (%s)", len(dataset), cache_dir, report.summary())
    state.wait_for_everyone()


class CachedExamples(torch.utils.data.Dataset):
    """`dataset[(epoch, index)]` -> one cached example (the flip variant drawn as live training does)."""

    def __init__(self, cache_dir, spec: CacheSpec, seed: int = 0):
        self.cache_dir, self.seed, self.spec, self.flip = Path(cache_dir), seed, spec, spec.flip
        info = check_cache(cache_dir, spec)
        self.num_samples = info["num_samples"]
        self.report = SkipReport.from_dict(info.get("skipped", {}))
        self.where: Dict[Tuple[int, int], Tuple[str, int]] = {}
        for shard in info["shards"]:
            with safe_open(str(self.cache_dir / shard), "pt") as f:
                for row, (i, v) in enumerate(zip(f.get_tensor("index").tolist(), f.get_tensor("variant").tolist())):
                    self.where[(i, v)] = (shard, row)
        expected = self.num_samples * (2 if self.flip else 1)
        if len(self.where) != expected:
            raise CacheMismatchError(f"{cache_dir} holds {len(self.where)} examples, expected {expected}: the cache is incomplete")
        self._files: Dict[str, object] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):  # open safetensors files do not pickle (DataLoader workers)
        return {**self.__dict__, "_files": {}}

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        epoch, index = key
        variant = int(self.flip and sample_rng(self.seed, epoch, index).random() < 0.5)
        shard, row = self.where[(index, variant)]
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.cache_dir / shard), "pt")
        f = self._files[shard]
        item = {k: f.get_slice(k)[row:row + 1][0] for k in ("features", "mask", "tokens", "residual")}
        return {**item, "index": index, "replaced": ""}
