"""Prior preservation: training batches mix the user's images with captioned images of the base model's
own world, so a fine-tune that teaches a new concept keeps drawing what the model drew before.

`--prior_ratio R` makes a fraction R of the image slots a prior sample (0: off). The prior samples,
`--prior_images N` of them, are made once before training into `OUTPUT/prior/` (an image folder with
`metadata.jsonl`, as `hart.training.data` reads) and reused by a resumed run:

- with `--prior_prompts FILE` (one prompt per line; used even where the model declares a world), the
  base model draws them at its own guidance (`HARTPipeline.config.guidance_scale`, as the pipeline by
  default), prompt after prompt in turn, image `i` from the seed `seed + i`;
- otherwise from the world the model declares (`"world": "shapes"` in its folder's `bundled.json`):
  shapes-world scenes rendered with their captions (`hart.data.shapes`, `hart.data.captions`), drawn
  from the run's seed.

`prior/prior_info.json` records how the folder was made; a resumed run that would make it otherwise
is refused. Prior images are used at the model's resolution, centre crop, never flipped (a flip
contradicts captions that say left and right).

The mix is a fixed schedule over the stream of image slots: slot `s` (counted over all processes
and micro-batches) is a prior sample when `floor((s + 1) R) > floor(s R)`, with R as a fraction
(denominator at most 1000), so any number of slots holds `floor(slots R)` prior samples. User and prior samples each
come from their own seeded epoch permutations; the position is the number of micro-batches a
process has consumed, as for `ResumableBatchSampler`, so a run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from hart.training.checks import PRIOR_DIR, PRIOR_INFO, made_before
from hart.training.sampler import ResumableBatchSampler, check_enough_samples

METADATA = "metadata.jsonl"
MAX_RATIO_DENOMINATOR = 1000


def describe(recipe: dict) -> str:
    """Where the prior images of `recipe` come from, in words."""
    if "world" in recipe:
        return f"rendered from the {recipe['world']} world"
    return f"drawn by the base model from {len(recipe['prompts'])} prompt(s)"


# ---- making the prior folder ---------------------------------------------------------------------

def render_world(world: str, n: int, seed: int) -> List[Tuple[object, str]]:
    """`n` (image, caption) pairs of `world`, all drawn from one generator seeded with `seed`."""
    from hart.data.captions import caption
    from hart.data.shapes import render, sample_scene

    assert world == "shapes", world  # `model_world` admits only known worlds
    rng = np.random.default_rng([seed, 1])  # 1: not the generator of a dataset written with the same seed
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng)
        pairs.append((render(scene), caption(scene, rng)))
    return pairs


def make_prior_folder(out: Path, recipe: dict, state,
                      draw: Callable[[Sequence[str], Sequence[int], float], np.ndarray], chunk: int = 16) -> Path:
    """Write (or reuse) `out/prior`; every process calls this.

    `draw(prompts, seeds, guidance_scale)` -> `(B, H, W, 3)` uint8 images of the base model (prompt recipes only; every
    process draws an equal share, padded, so sharded models run the same steps on all of them).
    """
    folder, tmp = out / PRIOR_DIR, out / (PRIOR_DIR + ".partial")
    if made_before(folder, recipe):
        return folder
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    n, names = recipe["num_images"], [f"{i:05d}.png" for i in range(recipe["num_images"])]
    if "world" in recipe:
        if state.is_main_process:
            pairs = render_world(recipe["world"], n, recipe["seed"])
            for name, (image, _) in zip(names, pairs):
                image.save(tmp / name)
            captions = [text for _, text in pairs]
    else:
        prompts = recipe["prompts"]
        captions = [prompts[i % len(prompts)] for i in range(n)]
        per_process = -(-n // state.num_processes)
        mine = [min(state.process_index + k * state.num_processes, n - 1) for k in range(per_process)]
        for lo in range(0, per_process, chunk):
            index = mine[lo:lo + chunk]
            images = draw([captions[i] for i in index], [recipe["seed"] + i for i in index], recipe["guidance_scale"])
            for i, image in zip(index, images):
                Image.fromarray(image).save(tmp / names[i])  # a padded index writes the same image again
    state.wait_for_everyone()
    if state.is_main_process:
        lines = [json.dumps({"file_name": name, "text": text}) for name, text in zip(names, captions)]
        (tmp / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / PRIOR_INFO).write_text(json.dumps(recipe, indent=1), encoding="utf-8")
        tmp.rename(folder)
    state.wait_for_everyone()
    return folder


# ---- mixing --------------------------------------------------------------------------------------

class MixedExamples(torch.utils.data.Dataset):
    """`dataset[(source, epoch, index)]`: an item of the user's data (source 0) or of the prior data
    (source 1), with `prior` (0 or 1) added."""

    def __init__(self, user, prior):
        self.sources = (user, prior)

    def __len__(self) -> int:
        return len(self.sources[0])

    def __getitem__(self, key: Tuple[int, int, int]) -> dict:
        source, epoch, index = key
        return {**self.sources[source][(epoch, index)], "prior": source}


class MixedBatchSampler(torch.utils.data.Sampler):
    """An endless stream of this rank's micro-batches of `(source, epoch, index)` keys, a fraction
    `ratio` of them prior samples (see the module's docstring)."""

    def __init__(self, num_user: int, num_prior: int, ratio: float, batch_size: int, *, world_size: int = 1,
                 rank: int = 0, seed: int = 0, start: int = 0):
        check_enough_samples(num_user, batch_size, world_size)
        self.ratio = Fraction(ratio).limit_denominator(MAX_RATIO_DENOMINATOR)
        if not 0 < self.ratio < 1:
            raise ValueError(f"the prior ratio must lie between 0 and 1, got {ratio}")
        self.num_user, self.num_prior, self.batch_size = num_user, num_prior, batch_size
        self.world_size, self.rank, self.seed, self.start = world_size, rank, seed, start
        # the user data's epochs are permuted as without prior samples
        self.user_order = ResumableBatchSampler(num_user, batch_size, world_size=world_size, seed=seed).epoch_order

    def prior_slots(self, slots: int) -> int:
        """How many of the first `slots` image slots are prior samples."""
        return slots * self.ratio.numerator // self.ratio.denominator

    def prior_seen(self, consumed: int) -> int:
        """Prior samples among all processes' images after `consumed` micro-batches each."""
        return self.prior_slots(consumed * self.batch_size * self.world_size)

    def position(self, consumed: int) -> Tuple[int, int]:
        """(epoch, sample within the epoch) of the user's data after `consumed` micro-batches."""
        slots = consumed * self.batch_size * self.world_size
        return divmod(slots - self.prior_slots(slots), self.num_user)

    def _prior_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, epoch]).permutation(self.num_prior)

    def _key(self, slot: int, orders: dict) -> Tuple[int, int, int]:
        prior = self.prior_slots(slot)
        source, position, size = (1, prior, self.num_prior) if self.prior_slots(slot + 1) > prior else \
            (0, slot - prior, self.num_user)
        epoch, i = divmod(position, size)
        if (source, epoch) not in orders:
            if len(orders) > 4:  # only the current epochs' orders are needed
                orders.clear()
            orders[(source, epoch)] = self._prior_order(epoch) if source else self.user_order(epoch)
        return source, epoch, int(orders[(source, epoch)][i])

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        orders: dict = {}
        consumed = self.start
        while True:
            first = (consumed * self.world_size + self.rank) * self.batch_size
            yield [self._key(s, orders) for s in range(first, first + self.batch_size)]
            consumed += 1


def prior_examples(folder: Path, resolution: int, seed: int, cache_spec=None, encoders=None, state=None):
    """The prior samples of `folder`, read like the user's data: live (`cache_spec` None) or from a cache
    in `folder/cache`, made on first use with `encoders` (vae, text encoder, its tokenizer, system prompt)."""
    from hart.training.cache import CachedExamples, build_cache
    from hart.training.data import ImageCaptionFolder

    images = ImageCaptionFolder(folder, resolution, crop="center", flip=False, seed=seed, min_size=1)
    if cache_spec is None:
        return images
    spec, cache = dataclasses.replace(cache_spec, flip=False), folder / "cache"
    if not cache.is_dir():
        vae, text_encoder, tokenizer, system_prompt = encoders
        build_cache(cache, images, spec, vae, text_encoder, tokenizer, system_prompt=system_prompt, state=state)
    return CachedExamples(cache, spec, seed)
