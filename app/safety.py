"""Optional prompt safety hook for the demo (off by default).

A safety checker is any `Callable[[str], bool]` that returns True when a prompt is unsafe; the demo
then refuses the prompt with a message (the official demo silently swapped it for "A red heart.").
`ShieldGemmaChecker` is one such callable, built on a local copy of Google's ShieldGemma
(e.g. `google/shieldgemma-2b`, downloaded beforehand; nothing is fetched here), as the official
HART demo used it: the prompt is unsafe when P("Yes") > threshold for the question "does this
prompt violate the policy?".
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional, Union

SafetyChecker = Callable[[str], bool]

POLICY = """\
* "No Dangerous Content": The prompt shall not contain or seek generation of content that harms oneself \
and/or others (e.g., accessing or building firearms and explosive devices, promotion of terrorism, \
instructions for suicide).
* "No Harassment": The prompt shall not contain or seek generation of content that is malicious, \
intimidating, bullying, or abusive content targeting another individual.
* "No Hate Speech": The prompt shall not contain or seek generation of content that targets identity \
and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls to violence against \
protected groups) or dehumanizes, belittles or vilifies on the basis of race, ethnicity, religion, \
disability, age, nationality, veteran status, sexual orientation, gender, gender identity, caste, or any \
other protected status.
* "No Sexually Explicit Information": The prompt shall not contain or seek generation of content that \
contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content \
aimed at causing arousal)."""

TEMPLATE = """\
You are a policy expert trying to help determine whether a user prompt is in violation of the defined \
safety policies.

<start_of_turn>
Human Question: {prompt}
<end_of_turn>

Our safety principle is defined in the below:

{policy}

Does the human question violate the above principle? Your answer must start with 'Yes' or 'No'. \
And then walk through step by step to be sure we answer correctly.
"""


class ShieldGemmaChecker:
    """`checker(prompt) -> True` when ShieldGemma judges the prompt unsafe.

    The model folder is checked now; the model itself is loaded on the first call (from that
    folder only, never from the network), on `device` (default: CUDA when available).
    """

    def __init__(self, folder: Union[str, Path], device: Optional[str] = None, threshold: float = 0.5,
                 policy: str = POLICY):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"--safety-model: {self.folder} is not a model folder (no config.json); "
                                    "give a local copy of a ShieldGemma model such as google/shieldgemma-2b")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.device, self.threshold, self.policy = device, threshold, policy
        self._model = self._tokenizer = self._yes_no = None
        self._lock = threading.Lock()

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        vocab = tokenizer.get_vocab()
        if "Yes" not in vocab or "No" not in vocab:
            raise ValueError(f"{self.folder}: the tokenizer has no 'Yes'/'No' tokens; is this a ShieldGemma model?")
        model = AutoModelForCausalLM.from_pretrained(
            self.folder, local_files_only=True, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        self._yes_no = [vocab["Yes"], vocab["No"]]
        self._tokenizer, self._model = tokenizer, model.to(device).eval()

    def unsafe_probability(self, prompt: str) -> float:
        """P("Yes") against P("No") for "does this prompt violate the policy?"."""
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            text = TEMPLATE.format(prompt=prompt.strip(), policy=self.policy)
            inputs = self._tokenizer(text, return_tensors="pt").to(self._model.device)
            with torch.no_grad():
                logits = self._model(**inputs).logits[0, -1, self._yes_no].float()
        return torch.softmax(logits, dim=0)[0].item()

    def __call__(self, prompt: str) -> bool:
        return self.unsafe_probability(prompt) > self.threshold
