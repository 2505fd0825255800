"""The facts a shapes-world caption states, as class indices, and a head that reads them from text features.

A caption's spec (`hart.data.captions.describe`, `hart.data.grammar.describe`) says what the caption
claims: the category, up to two objects in the order the caption names them (shape, colour, size, and
for the first a grid cell or an exact count), the relation of the first to the second, and the
background. `fact_targets(spec)` turns it into one class index per fact, where 0 means "not stated".

`FactHead` reads those facts back from a text model's final hidden states, the features the image
transformer attends to: one learned query per fact pools the caption's positions (padding masked
out), and a linear layer per fact classifies the pooled vector. Trained beside the language model
(`hart.data.text_model.train_text_model(..., specs=...)`), it pushes two wordings of one scene
towards features that say the same facts; trained alone on frozen features, it is a probe of what
those features carry (`hart.eval.text_probe`).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from hart.data.shapes import BACKGROUNDS, CATEGORIES, COLOURS, COUNTS, GRID, RELATIONS, SHAPES, SIZES

NOT_STATED = None
# fact name -> its classes; class 0 is "not stated" for every fact but the category, which is always known
FACTS: Dict[str, Tuple] = {
    "category": CATEGORIES,
    "shape_0": (NOT_STATED, *SHAPES), "colour_0": (NOT_STATED, *COLOURS), "size_0": (NOT_STATED, *SIZES),
    "position_0": (NOT_STATED, *(cell for row in GRID for cell in row)), "count_0": (NOT_STATED, *COUNTS),
    "shape_1": (NOT_STATED, *SHAPES), "colour_1": (NOT_STATED, *COLOURS), "size_1": (NOT_STATED, *SIZES),
    "relation": (NOT_STATED, *RELATIONS), "background": (NOT_STATED, *BACKGROUNDS),
}


def fact_targets(spec: dict) -> Dict[str, int]:
    """One class index per fact of `FACTS` for a caption's spec (0: the caption does not say)."""
    objects = list(spec["objects"])
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"a shapes-world spec names one or two objects, got {len(objects)}")
    values = {"category": spec["category"], "relation": spec.get("relation"), "background": spec.get("background")}
    for i, obj in enumerate(objects):
        values.update({f"shape_{i}": obj.get("shape"), f"colour_{i}": obj.get("colour"), f"size_{i}": obj.get("size")})
    values.update(position_0=objects[0].get("position"), count_0=objects[0].get("count"))
    targets = {}
    for name, classes in FACTS.items():
        value = values.get(name)
        if value not in classes:
            raise ValueError(f"spec value {value!r} is not one of the classes of fact {name!r}: {classes}")
        targets[name] = classes.index(value)
    return targets


def targets_tensor(specs: Sequence[dict]) -> torch.Tensor:
    """(B, F) long tensor of `fact_targets`, facts in the order of `FACTS`."""
    return torch.tensor([list(fact_targets(s).values()) for s in specs], dtype=torch.long)


class FactHead(nn.Module):
    """Per-fact attention pooling over the caption's positions, then a linear classifier per fact."""

    def __init__(self, dim: int):
        super().__init__()
        self.queries_FC = nn.Parameter(torch.randn(len(FACTS), dim) * dim ** -0.5)
        self.classifiers = nn.ModuleList(nn.Linear(dim, len(classes)) for classes in FACTS.values())

    def forward(self, features_BTC: torch.Tensor, mask_BT: torch.Tensor):
        """A list of (B, classes) logits, one per fact in the order of `FACTS`."""
        scores_BFT = torch.einsum("fc,btc->bft", self.queries_FC, features_BTC) * features_BTC.shape[-1] ** -0.5
        scores_BFT = scores_BFT.masked_fill(~mask_BT.bool()[:, None, :], float("-inf"))
        pooled_BFC = torch.einsum("bft,btc->bfc", scores_BFT.softmax(dim=-1), features_BTC)
        return [clf(pooled_BFC[:, f]) for f, clf in enumerate(self.classifiers)]

    def loss(self, features_BTC: torch.Tensor, mask_BT: torch.Tensor, targets_BF: torch.Tensor) -> torch.Tensor:
        """Mean over facts of the cross-entropy."""
        logits = self(features_BTC, mask_BT)
        return sum(nn.functional.cross_entropy(l, targets_BF[:, f]) for f, l in enumerate(logits)) / len(logits)

    @torch.no_grad()
    def accuracy(self, features_BTC: torch.Tensor, mask_BT: torch.Tensor, targets_BF: torch.Tensor) -> Dict[str, float]:
        """Share of rows whose class is right, per fact, and `all`: every fact of the row right."""
        right_BF = torch.stack([l.argmax(-1) for l in self(features_BTC, mask_BT)], dim=1) == targets_BF
        return {**{name: right_BF[:, f].float().mean().item() for f, name in enumerate(FACTS)},
                "all": right_BF.all(dim=1).float().mean().item()}
