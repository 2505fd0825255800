"""How well a text model's features carry a caption's facts: a probe trained on one set of wordings and
tested on others.

The probe is a fresh `hart.data.facts.FactHead` trained on frozen features, computed exactly as the
pipeline computes them for the image transformer (`hart.text.encode_prompts`, with the system prompt).
High accuracy on wordings the probe never saw, and the text model never saw, means two wordings of one
scene give features that say the same facts.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from hart.data import captions, grammar
from hart.data.facts import FactHead, targets_tensor
from hart.data.shapes import sample_scene
from hart.text import SYSTEM_PROMPT, encode_prompts

Captions = Sequence[Tuple[str, dict]]  # (caption, spec) pairs


@torch.no_grad()
def caption_features(captions: Captions, text_encoder, tokenizer, *, max_length: int = 32, batch_size: int = 256):
    """(features_NTC, mask_NT, targets_NF) of (caption, spec) pairs, on the pipeline's text path."""
    feats, masks = [], []
    for i in range(0, len(captions), batch_size):
        cond = encode_prompts([c for c, _ in captions[i:i + batch_size]], text_encoder, tokenizer,
                              max_length=max_length, system_prompt=SYSTEM_PROMPT)
        feats.append(cond.features_BTC.float())
        masks.append(cond.mask_BT)
    return torch.cat(feats), torch.cat(masks), targets_tensor([s for _, s in captions])


def probe_facts(text_encoder, tokenizer, train: Captions, tests: Dict[str, Captions], *, steps: int = 1000,
                batch_size: int = 256, lr: float = 3e-3, seed: int = 0, max_length: int = 32) -> Dict[str, Dict[str, float]]:
    """Train a fact probe on `train`'s features; its accuracy per fact (and `all`) on each set of `tests`."""
    features, mask, targets = caption_features(train, text_encoder, tokenizer, max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the probe's initialisation and batches; the caller's RNG state is kept
        probe = FactHead(features.shape[-1])
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
        for _ in range(steps):
            rows = torch.randint(len(features), (batch_size,))
            loss = probe.loss(features[rows], mask[rows], targets[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()
    return {name: probe.accuracy(*caption_features(pairs, text_encoder, tokenizer, max_length=max_length))
            for name, pairs in tests.items()}


def wording_report(text_encoder, tokenizer, *, train_scenes: int = 4000, test_scenes: int = 2000, seed: int = 99,
                   steps: int = 1500) -> Dict[str, Dict[str, float]]:
    """The probe of a shapes-world text model: trained on grammar captions (training wordings) of
    `train_scenes` scenes and template captions of half of them, tested on fresh scenes worded three
    ways: the fixed templates (`templates`, how the committed prompts are worded), the grammar's
    training wordings (`grammar`) and its held-out wordings (`heldout`)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(train_scenes + test_scenes)]
    train = ([grammar.describe(s, rng) for s in scenes[:train_scenes]]
             + [captions.describe(s, rng) for s in scenes[:train_scenes // 2]])
    test = scenes[train_scenes:]
    tests = {"templates": [captions.describe(s, rng) for s in test], "grammar": [grammar.describe(s, rng) for s in test],
             "heldout": [grammar.describe(s, rng, heldout=True) for s in test]}
    return probe_facts(text_encoder, tokenizer, train, tests, steps=steps, seed=seed)
