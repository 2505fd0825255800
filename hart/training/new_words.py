"""New words (`--new_words`, off by default): caption words that get text tokens of their own.

A small tokenizer spells an unknown word with pieces of known ones ("pink" -> "p", "in", "k"), and the
frozen text model then gives it features close to those other words: adapters that learn the new word
also change what the old ones draw ("in" is the piece of "in the top left"). A token of its own, whose
embedding is drawn at random from the spread of the existing ones, gives the new word features the old
captions never have. The embedding stays fixed: the adapters learn to read it, so captions cached before
training stay valid. The run exports the tokenizer and text model with the new tokens. What it costs and
buys is measured in docs/training.md ("New words").

`--new_words auto` picks the words the tokenizer spells out that the captions of the prior samples (the
model's world, or `--prior_prompts`) never use: a word those captions use is known to the model, however
it is spelled.
"""
from __future__ import annotations

from typing import List, Sequence, Set

import numpy as np
import torch
from tokenizers import AddedToken

from hart.text import caption_words, split_words
from hart.training.checks import SettingError

WORLD_CAPTIONS = 4096  # captions drawn from a world to collect its words (every template shows up)


def known_words(recipe: dict) -> Set[str]:
    """The words of the base model's own captions: those of its world, or of the prior prompts."""
    if "prompts" in recipe:
        return caption_words(recipe["prompts"])
    from hart.data.captions import caption
    from hart.data.shapes import sample_scene

    assert recipe["world"] == "shapes", recipe  # `model_world` admits only known worlds
    rng = np.random.default_rng(0)
    return caption_words(caption(sample_scene(rng), rng) for _ in range(WORLD_CAPTIONS))


def pick_new_words(setting: str, tokenizer, captions: Sequence[str], recipe) -> List[str]:
    """The words that get tokens of their own under `setting`: "auto" (spelled out, and unknown to the
    model's captions; none without prior samples, since then nothing tells what the model knows),
    "none", or a comma-separated list."""
    if setting == "none":
        return []
    if setting != "auto":
        return sorted({w.strip().lower() for w in setting.split(",")} - {""})
    if recipe is None:
        return []
    return sorted(set(split_words(tokenizer, captions)) - known_words(recipe))


def add_words(tokenizer, text_encoder, words: Sequence[str], seed: int) -> None:
    """Give each word a whole-word token in `tokenizer` and an embedding row in `text_encoder`, drawn
    from a normal with the existing rows' per-feature mean and spread (seeded: the same words and seed
    give the same rows, so a resumed run and the export agree with the run)."""
    known = [w for w in words if w in tokenizer.get_vocab()]
    if known:
        raise SettingError(f"--new_words: the text tokenizer already has a token for {', '.join(known)}")
    old = len(tokenizer)
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words])
    embeddings = text_encoder.get_input_embeddings()
    if len(tokenizer) > embeddings.weight.shape[0]:  # a large model keeps spare rows past its vocabulary
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows drawn below
        embeddings = text_encoder.get_input_embeddings()
    weight = embeddings.weight
    rows = weight[:old].detach().float()
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(len(words), weight.shape[1], generator=generator) * rows.std(0) + rows.mean(0)
    with torch.no_grad():
        weight[old:old + len(words)] = new.to(weight.dtype)
