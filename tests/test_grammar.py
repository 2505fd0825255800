"""The caption grammar (`hart.data.grammar`), its held-out wordings and the held-out ShapesEval prompt set."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from hart.data import captions
from hart.data.grammar import (HELDOUT, LEADS, NO_SHAPE, NUMBERS, PHRASES, PLURAL, RELATIONS, SIZE_WORDS, WHERE, Wordings,
                               describe)
from hart.data.shapes import CATEGORIES, COLOURS, GREY, SHAPES, Scene, render, sample_scene
from hart.data.shapes_dataset import dumps_prompts, make_eval_prompts, make_heldout_prompts, write_dataset
from hart.eval.shapes_eval import HELDOUT_PROMPTS_PATH, evaluate, load_prompts


def _draws(seed, n, heldout=False, category=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng, category or CATEGORIES[i % len(CATEGORIES)])
        out.append((scene, *describe(scene, rng, heldout)))
    return out


def _plain(text):
    return text.lower().rstrip(".!")


def _alternatives(options):
    return "(?:" + "|".join(re.escape(o) for o in sorted(set(options), key=len, reverse=True)) + ")"


FIELDS = {  # what each field of a phrase may say; a noun phrase ({n}, {m}, {bare}) may say anything
    "lead": _alternatives(LEADS + tuple(PLURAL.values())), "where": _alternatives(sum(WHERE.values(), ())),
    "rel": _alternatives(sum(RELATIONS.values(), ())), "count": _alternatives(sum(NUMBERS.values(), ())),
    "bg": _alternatives(COLOURS + ("grey", "gray")), "colour": _alternatives(COLOURS),
    "noun": _alternatives(SHAPES + NO_SHAPE),
}


def _template_regex(template):
    """A template as a regular expression over plain captions: fields match what they may say, "a" also "an"."""
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(FIELDS.get(p[1:-1], ".+?") if p.startswith("{")
                              else re.sub(r"(^|(?<= ))a\\ ", r"\1an?\\ ", re.escape(p)) for p in parts))


def _phrase(phrase):
    return rf"(?<![\w-]){re.escape(phrase)}(?![\w-])"


def _contains(text, phrase):
    return re.search(_phrase(phrase), text) is not None


def _claims(text):
    """What a plain caption says, read back from its words."""
    words = re.findall(r"[\w-]+", text)
    sizes = [s for w in words for s, options in SIZE_WORDS.items() if w in options]
    numbers = [n for w in words for n, options in NUMBERS.items() if w in options]
    relations = {r for r, options in RELATIONS.items() for o in options if _contains(text, o)}
    for o in sorted((o for options in RELATIONS.values() for o in options), key=len, reverse=True):
        text = re.sub(_phrase(o), "<relation>", text)  # "on the left of" names no grid cell
    cells = [(len(o), cell) for cell, options in WHERE.items() for o in options if _contains(text, o)]
    return {"colours": Counter(w for w in words if w in COLOURS),
            "shapes": Counter(w.rstrip("s") for w in words if w.rstrip("s") in SHAPES),
            "sizes": Counter(sizes), "numbers": numbers, "cell": max(cells)[1] if cells else None,
            "relations": relations}


def _check_claims(text, spec):
    claims, objs = _claims(_plain(text)), spec["objects"]
    background = [spec["background"]] if spec["background"] not in (None, GREY) else []
    assert claims["colours"] == Counter([o["colour"] for o in objs if o["colour"]] + background), text
    assert claims["shapes"] == Counter(o["shape"] for o in objs if o["shape"]), text
    assert claims["sizes"] == Counter(o["size"] for o in objs if o["size"]), text
    assert claims["numbers"] == [o["count"] for o in objs if o["count"]], text
    assert claims["cell"] == objs[0]["position"], text
    assert claims["relations"] == ({spec["relation"]} if spec["relation"] else set()), text
    if spec["background"] == GREY:
        assert re.search(r"\bgr[ae]y\b", _plain(text)), text


@pytest.mark.parametrize("heldout", [False, True])
@pytest.mark.parametrize("category", CATEGORIES)
def test_every_phrase_renders_and_claims_its_spec(monkeypatch, category, heldout):
    options = PHRASES[category].heldout if heldout else PHRASES[category].train
    for k, template in enumerate(options):
        monkeypatch.setitem(PHRASES, category, Wordings((template,), (template,)))
        for scene, text, spec in _draws(k, 40, heldout, category):
            assert _template_regex(template).fullmatch(_plain(text)), (template, text)
            assert spec["category"] == category
            _check_claims(text, spec)
            assert evaluate(render(scene), spec)["passed"], (text, spec)


def test_specs_match_scenes_and_captions():
    for heldout in (False, True):
        for scene, text, spec in _draws(11, 400, heldout):
            assert evaluate(render(scene), spec)["passed"], (text, spec)
            _check_claims(text, spec)
            assert text == text.strip() and "  " not in text and not re.search(r"\ba [aeiou]", _plain(text))


def test_pairs_come_in_both_orders_with_the_relation_following():
    firsts, relations = Counter(), Counter()
    for scene, text, spec in _draws(5, 300, category="relative_position"):
        a, b = scene.objects
        first = (spec["objects"][0]["shape"], spec["objects"][0]["colour"])
        firsts[first == (a.shape, a.colour)] += 1
        relations[spec["relation"]] += 1
    assert min(firsts.values()) > 100 and len(relations) == 4


def test_wordings_vary_case_punctuation_articles_and_numbers():
    texts = [t for _, t, _ in _draws(2, 800)]
    assert any(t.isupper() for t in texts) and any(t[:1].isupper() and not t.isupper() for t in texts)
    assert any(t.endswith(".") for t in texts) and any(t.endswith("!") for t in texts)
    assert any(t[-1].isalpha() for t in texts)
    plain = [_plain(t) for t in texts]
    assert any(re.search(r"\b[234]\b", t) for t in plain) and any(re.search(r"\b(two|three|four)\b", t) for t in plain)
    for pattern in (r"\bthere are\b", r"\bthe\b", r"\ban image of\b", r"^(red|green|blue|yellow|orange|purple|white|black) "):
        assert any(re.search(pattern, t) for t in plain), pattern


def test_heldout_phrases_are_new_sentences_of_known_words():
    train = [_plain(t) for _, t, _ in _draws(3, 5000)]
    rng = np.random.default_rng(3)
    templates = [captions.describe(sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]), rng)[0] for i in range(2000)]
    for category, options in HELDOUT.items():
        assert options, category
        for template in options:  # neither a training phrase of the grammar nor a caption template
            regex = _template_regex(template)
            assert not any(regex.fullmatch(t) for t in train + templates), template
    # every held-out caption is worded with a held-out phrase, and with words training captions use
    vocabulary = {w for t in train for w in re.findall(r"[\w-]+", t)}
    for scene, text, spec in _draws(4, 400, heldout=True):
        assert any(_template_regex(t).fullmatch(_plain(text)) for t in HELDOUT[scene.category]), text
        assert set(re.findall(r"[\w-]+", _plain(text))) <= vocabulary, text


def test_issue_synonyms_are_training_words():
    train = " ".join(_plain(t) for _, t, _ in _draws(6, 5000))
    for words in (("big", "large", "huge"), ("tiny", "small"), ("above", "over", "on top of"),
                  ("left of", "to the left of", "on the left side of"), ("2", "two"),
                  ("there is", "there are", "an image of", "a picture showing")):
        for w in words:
            assert _contains(train, w), w


def test_drawn_afresh_and_deterministic_by_seed():
    assert _draws(9, 60) == _draws(9, 60)
    assert [t for _, t, _ in _draws(9, 60)] != [t for _, t, _ in _draws(10, 60)]
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "two_objects")
    assert len({describe(scene, rng)[0] for _ in range(30)}) > 10


def test_heldout_prompt_set_is_committed_and_matches_its_scenes():
    records = load_prompts(HELDOUT_PROMPTS_PATH)
    assert HELDOUT_PROMPTS_PATH.read_text(encoding="utf-8") == dumps_prompts(make_heldout_prompts())
    committed = make_eval_prompts()
    assert [(r["index"], r["category"], r["scene"]) for r in records] == \
        [(r["index"], r["category"], r["scene"]) for r in committed]
    for r in records:
        assert evaluate(render(Scene.from_dict(r["scene"])), r)["passed"], r["prompt"]
        assert any(_template_regex(t).fullmatch(_plain(r["prompt"])) for t in HELDOUT[r["category"]])
        _check_claims(r["prompt"], r)
    for c in CATEGORIES:
        prompts = [_plain(r["prompt"]) for r in records if r["category"] == c]
        assert len(set(prompts)) == len(prompts)


def test_heldout_prompt_script(tmp_path):
    from scripts.make_shapes_dataset import main

    assert main(["--heldout-prompts", str(tmp_path / "h.jsonl")]) == 0
    assert (tmp_path / "h.jsonl").read_text(encoding="utf-8") == HELDOUT_PROMPTS_PATH.read_text(encoding="utf-8")


def test_dataset_with_grammar_variants(tmp_path):
    from hart.training.data import scan_folder

    folder = write_dataset(tmp_path / "g", 6, seed=2, grammar_variants=3)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [x["file_name"] for x in lines] == [f"{i:05d}_{v}.png" for i in range(6) for v in range(3)]
    for i in range(6):  # one picture per image, its captions drawn afresh
        assert len({(folder / f"{i:05d}_{v}.png").read_bytes() for v in range(3)}) == 1
    assert sum(len({x["text"] for x in lines[3 * i: 3 * i + 3]}) == 3 for i in range(6)) >= 4
    entries, report = scan_folder(folder, min_size=128)
    assert len(entries) == 18 and not report.total
    again = write_dataset(tmp_path / "h", 6, seed=2, grammar_variants=3)
    assert (again / "metadata.jsonl").read_text() == (folder / "metadata.jsonl").read_text()
    with pytest.raises(ValueError, match="grammar_variants"):
        write_dataset(tmp_path / "bad", 2, seed=0, grammar_variants=-1)

