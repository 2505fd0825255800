"""The facts of a caption (hart.data.facts), the text model's fact loss and the fact probe (hart.eval.text_probe)."""
import json

import numpy as np
import pytest
import torch

from hart.data import captions, grammar
from hart.data.facts import FACTS, FactHead, fact_targets, targets_tensor
from hart.data.shapes import CATEGORIES, sample_scene


def _pairs(n: int, seed: int, heldout: bool = False):
    rng = np.random.default_rng(seed)
    return [grammar.describe(sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]), rng, heldout=heldout) for i in range(n)]


def test_targets_name_what_the_caption_states():
    for text, spec in _pairs(400, 0) + _pairs(100, 1, heldout=True):
        t = fact_targets(spec)
        assert set(t) == set(FACTS)
        named = {name: FACTS[name][i] for name, i in t.items()}
        assert named["category"] == spec["category"] and named["relation"] == spec["relation"]
        assert named["background"] == spec["background"]
        for i, obj in enumerate(spec["objects"]):
            assert (named[f"shape_{i}"], named[f"colour_{i}"], named[f"size_{i}"]) == (obj["shape"], obj["colour"], obj["size"])
        assert (named["position_0"], named["count_0"]) == (spec["objects"][0]["position"], spec["objects"][0]["count"])
        if len(spec["objects"]) == 1:  # a second object the caption does not name is "not stated"
            assert t["shape_1"] == t["colour_1"] == t["size_1"] == 0


def test_a_template_caption_and_a_grammar_caption_of_one_scene_state_the_same_facts():
    rng = np.random.default_rng(3)
    same = 0
    for _ in range(200):
        scene = sample_scene(rng, "position")
        a, b = captions.describe(scene, rng)[1], grammar.describe(scene, rng)[1]
        same += fact_targets(a) == fact_targets(b)  # equal unless one of them mentions the size
    assert same > 100


@pytest.mark.parametrize("bad, words", [
    ({"category": "single_object", "objects": [], "relation": None, "background": None}, "one or two objects"),
    ({"category": "single_object", "objects": [{"shape": "star", "colour": "red"}], "relation": None,
      "background": None}, "'star'"),
    ({"category": "painting", "objects": [{"shape": "circle"}], "relation": None, "background": None}, "'painting'"),
])
def test_a_spec_outside_the_world_is_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        fact_targets(bad)


def test_fact_head_reads_only_the_caption_positions():
    torch.manual_seed(0)
    head = FactHead(16)
    feats = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    changed = feats.clone()
    changed[~mask] = 100.0  # padding (and cut system-prompt) positions hold anything
    for a, b in zip(head(feats, mask), head(changed, mask)):
        assert a.shape[-1] == b.shape[-1] and torch.allclose(a, b, atol=1e-6)


def test_text_model_with_facts_learns_them_and_the_probe_reads_them(tmp_path):
    """A tiny text model trained with the fact loss on the system-prompt path: its features name each
    caption's colour and shape far above chance for a fresh probe, on captions of scenes it never saw."""
    from hart.data.text_model import load_text_model, train_text_model
    from hart.eval.text_probe import probe_facts
    from hart.text import SYSTEM_PROMPT

    train = _pairs(600, 0)
    folder = train_text_model([c for c, _ in train], tmp_path / "tm", vocab_size=96, hidden=32, layers=1, heads=2,
                              steps=150, batch_size=32, lr=1e-2, specs=[s for _, s in train],
                              system_prompt=SYSTEM_PROMPT)
    report = json.loads((folder / "training.json").read_text())
    assert report["system_prompt"] and report["final_fact_loss"] < 0.7
    tokenizer, model = load_text_model(folder)
    acc = probe_facts(model, tokenizer, train, {"new scenes": _pairs(200, 5)}, steps=150, batch_size=64)["new scenes"]
    assert set(acc) == {*FACTS, "all"}
    majority = targets_tensor([s for _, s in _pairs(200, 5)])[:, list(FACTS).index("colour_0")].bincount().max() / 200
    assert acc["colour_0"] > max(0.6, majority + 0.3) and acc["shape_0"] > 0.7, acc


def test_specs_must_match_the_captions(tmp_path):
    from hart.data.text_model import train_text_model

    train = _pairs(10, 0)
    with pytest.raises(ValueError, match="one spec per caption"):
        train_text_model([c for c, _ in train], tmp_path / "tm", vocab_size=64, hidden=16, layers=1, heads=2,
                         steps=1, specs=[s for _, s in train[:5]])
