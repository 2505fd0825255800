"""Prompt -> text features, mask and position ids, with any Hugging Face text model.

HART conditions on the final hidden state of a decoder LLM (Qwen2-1.5B for the release) over the
prompt padded to a fixed length. The reference prepends a "prompt enhancer" system prompt to every
prompt so that the LLM's features describe an enhanced prompt; the features of the system prompt
itself are dropped.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, NamedTuple, Optional, Sequence, Set, Union

import torch

logger = logging.getLogger(__name__)

# The system prompt of the released model (its `llm_system_prompt`). Exact text matters: the released
# weights were trained on features computed with it.
SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation.\n\n"
    "Examples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any additional "
    'sentences. Start your response with "Enhanced Prompt:".\n\n'
    "User Prompt:\n"
)


class TextConditioning(NamedTuple):
    """What the transformer reads from a prompt batch."""

    features_BTC: torch.Tensor  # float32, final hidden state of the text model
    mask_BT: torch.Tensor  # bool, True on real (non-padding) tokens
    position_ids_BT: torch.Tensor  # int64, cumsum(mask) - 1: padding repeats the last real position

    @property
    def batch_size(self) -> int:
        return self.features_BTC.shape[0]

    def repeat_interleave(self, n: int) -> "TextConditioning":
        return TextConditioning(*(t.repeat_interleave(n, dim=0) for t in self))

    @staticmethod
    def unconditional(batch_size: int, num_tokens: int, dim: int, device) -> "TextConditioning":
        """The release's unconditional branch: zero features, zero positions, mask with index 0 set."""
        mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return TextConditioning(
            torch.zeros(batch_size, num_tokens, dim, device=device),
            mask,
            torch.zeros(batch_size, num_tokens, dtype=torch.long, device=device),
        )


def check_prompts(prompt: Union[str, Sequence[str]], name: str = "prompt") -> List[str]:
    """Validate a prompt argument and return it as a list of non-empty strings."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__}.")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise TypeError(f"`{name}[{i}]` must be a string (`{name}` is a list of strings), got "
                            f"{type(p).__name__} {p!r:.40}.")
    if len(prompt) == 0:
        raise ValueError(f"`{name}` is an empty list: give at least one prompt.")
    if any(not p.strip() for p in prompt):
        raise ValueError(f"`{name}` contains an empty prompt.")
    return list(prompt)


def caption_words(texts: Iterable[str]) -> Set[str]:
    """The distinct words of `texts`, lower-cased, without surrounding punctuation."""
    return {w.strip(".,;:!?\"'()").lower() for text in texts for w in text.split()} - {""}


def split_words(tokenizer, texts: Sequence[str]) -> List[str]:
    """The words of `texts` that the tokenizer spells out: three or more pieces averaging under 2.5
    characters ("star" -> "▁s", "t", "ar"). A text model reads such a word letter by letter, so
    fine-tuning learns it slowly, if at all; a large tokenizer splits long words into whole syllables,
    which this leaves alone."""
    spelled = []
    for word in sorted(caption_words(texts)):
        pieces = [p.lstrip("▁Ġ") for p in tokenizer.tokenize(" " + word)]
        if len(pieces) >= 3 and sum(map(len, pieces)) / len(pieces) < 2.5:
            spelled.append(word)
    return spelled


def count_tokens(tokenizer, prompts: List[str]) -> List[int]:
    """Tokens of each prompt as `encode_prompts` reads it, before truncation. `verbose=False`: the
    tokenizer's "longer than the maximum length" notice is ours to give, once, as a truncation."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    text_encoder,
    tokenizer,
    max_length: int = 300,
    system_prompt: Optional[str] = SYSTEM_PROMPT,
) -> TextConditioning:
    """Encode prompts as the released model expects.

    Each prompt is padded (or truncated, with a warning) to `max_length` tokens. With a
    `system_prompt`, it is tokenized once, prepended to every row, and its positions are cut from the
    output, so the returned features, mask and position ids always cover the prompt tokens alone.
    """
    prompts = check_prompts(list(prompts) if not isinstance(prompts, str) else prompts)
    if tokenizer.pad_token_id is None:
        raise ValueError("The text tokenizer has no pad token; HART pads prompts to a fixed length.")
    device = text_encoder.device
    lengths = count_tokens(tokenizer, prompts)
    if max(lengths) > max_length:
        logger.warning(
            "A prompt has %d tokens; it is truncated to max_sequence_length=%d.", max(lengths), max_length
        )
    ids_BT = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )["input_ids"].to(device)
    mask_BT = ids_BT != tokenizer.pad_token_id
    position_ids_BT = torch.cumsum(mask_BT, dim=1) - 1

    input_ids, attention_mask = ids_BT, mask_BT
    num_system = 0
    if system_prompt:
        sys_ids = tokenizer(system_prompt, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        sys_ids = sys_ids.to(device).expand(len(prompts), -1)
        num_system = sys_ids.shape[1]
        input_ids = torch.cat([sys_ids, ids_BT], dim=1)
        attention_mask = torch.cat([torch.ones_like(sys_ids, dtype=torch.bool), mask_BT], dim=1)
    out = text_encoder(input_ids=input_ids, attention_mask=attention_mask.long(), output_hidden_states=True)
    features_BTC = out.hidden_states[-1][:, num_system:].float()
    return TextConditioning(features_BTC, mask_BT, position_ids_BT)
