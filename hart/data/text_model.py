"""A small text model for the bundled shapes-world pipeline: sentencepiece tokenizer + Qwen2 causal LM.

The bundled pipeline uses the same text path as the released model (a Qwen2-architecture decoder whose
final hidden state conditions the image), only tiny and trained here on the caption corpus:

1. `train_sentencepiece(captions, folder)`: a sentencepiece unigram model (`tokenizer.model`), with
   case folding; every character seen in the corpus is a piece, so an unknown *word* splits into
   known pieces, and an unknown *character* maps to `<unk>` (never an error).
2. `hf_tokenizer(spm_path)`: the same tokenizer as a `transformers.PreTrainedTokenizerFast` (a
   `tokenizers` Unigram model with the sentencepiece normaliser and metaspace pre-tokeniser), with
   `<pad>`, `<unk>`, `<s>`, `</s>` set. It saves a plain `tokenizer.json`, which
   `hart.loading.load_text_encoder` and `HARTPipeline.from_pretrained` load without sentencepiece.
3. `train_text_model(captions, folder, ...)`: a Qwen2 causal LM (`Qwen2ForCausalLM`) trained on the
   captions, saved with `save_pretrained` beside the tokenizer; `AutoModel` loads its `Qwen2Model`
   body, which is what the pipeline uses (frozen).

Why the LM gets a second loss: HART reads the *final* hidden state, and in a tiny LM (tied embeddings,
two layers) trained on templated captions that state holds little more than the next-token
guess. After "a red", the next piece is "circle", "square" or "triangle" whatever the colour, so
the colour is dropped, and the image model cannot recover it. So a throw-away linear readout must also
recover each position's own piece and the piece before it from the final hidden state: the LM still
predicts the next piece, and its final state keeps what was said. (Measured on the shapes world with a
transformer trained on the first four scales alone, held-out cross-entropy of the 1 x 1 token: 1.71
nats on next-piece-only features, 0.89 on plain word identities, 0.84 with the readout.)

Why a third, optional loss: the readout keeps the words, not what they mean, so "big" and "large", or
"there are 3 circles" and "a picture showing three circles", still give features the image
transformer must learn to read alike. Given each caption's spec, a throw-away `FactHead` must
name the scene's facts (objects, sizes, cell, count, relation, background) from the features, which
pulls every wording of one scene towards one reading (`hart.data.facts`).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from hart.data.facts import FactHead, targets_tensor

logger = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3


def train_sentencepiece(captions: Sequence[str], folder, vocab_size: int = 256) -> Path:
    """Train a unigram sentencepiece model on `captions`; writes `folder/tokenizer.model`."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "captions.txt"
    corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        normalization_rule_name="nmt_nfkc_cf", hard_vocab_limit=False, num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return folder / "tokenizer.model"


def hf_tokenizer(spm_path):
    """The sentencepiece model as a fast Hugging Face tokenizer (no sentencepiece needed to load it)."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="right", model_max_length=128,
    )


def qwen2_config(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        use_sliding_window=False,
    )


def train_text_model(captions: Sequence[str], folder, *, vocab_size: int = 256, hidden: int = 128, layers: int = 2,
                     heads: int = 4, steps: int = 600, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     max_positions: int = 256, log_every: int = 100, specs: Optional[Sequence[dict]] = None,
                     system_prompt: Optional[str] = None, max_length: int = 32) -> Path:
    """Train the tokenizer and a Qwen2 causal LM on `captions`; save both into `folder`.

    With `specs` (one per caption, as `hart.data.grammar.describe` returns them), a `FactHead` must also
    name each caption's facts from the final hidden states (`hart.data.facts`). With `system_prompt`, every
    caption is read after it, tokenized and cut to `max_length` tokens as `hart.text.encode_prompts` does,
    so the losses shape exactly the features the image transformer is given.

    Returns the folder, which `hart.loading.load_text_encoder(folder)` loads as (tokenizer, Qwen2Model).
    """
    from transformers import Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    spm_path = train_sentencepiece(captions, folder / "spm", vocab_size)
    tokenizer = hf_tokenizer(spm_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initialisation (the only torch draws); the caller's RNG state is kept
        model = Qwen2ForCausalLM(qwen2_config(len(tokenizer), hidden, layers, heads, max_positions))
        readout = torch.nn.Linear(hidden, 2 * len(tokenizer))  # this piece and the previous one; not saved
        fact_head = FactHead(hidden) if specs is not None else None  # not saved either
    params = [*model.parameters(), *readout.parameters(), *(fact_head.parameters() if fact_head else ())]
    if specs is not None and len(specs) != len(captions):
        raise ValueError(f"specs must give one spec per caption: {len(specs)} specs for {len(captions)} captions")
    prefix = tokenizer(system_prompt, truncation=True, max_length=max_length)["input_ids"] if system_prompt else []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    captions = list(captions)
    model.train()
    t0 = time.time()
    for step in range(steps):
        rows = [rnd.randrange(len(captions)) for _ in range(batch_size)]
        ids_BT, mask_BT = _caption_batch(tokenizer, [captions[r] for r in rows], prefix, max_length)
        labels = ids_BT.masked_fill(~mask_BT, -100)
        labels[:, :len(prefix)] = -100  # the system prompt is given, not learnt
        out = model(input_ids=ids_BT, attention_mask=mask_BT.long(), labels=labels, output_hidden_states=True)
        lm_loss = out.loss
        # hidden_states[-1] is what `hart.text.encode_prompts` hands to the transformer
        hidden_BTC = out.hidden_states[-1]
        this_BTV, prev_BTV = readout(hidden_BTC).chunk(2, dim=-1)
        readout_loss = (F.cross_entropy(this_BTV.flatten(0, 1), labels.flatten(), ignore_index=-100)
                        + F.cross_entropy(prev_BTV[:, 1:].flatten(0, 1), labels[:, :-1].flatten(), ignore_index=-100))
        loss = lm_loss + readout_loss
        fact_loss = torch.zeros(())
        if fact_head is not None:
            caption_mask_BT = mask_BT.clone()
            caption_mask_BT[:, :len(prefix)] = False
            fact_loss = fact_head.loss(hidden_BTC, caption_mask_BT, targets_tensor([specs[r] for r in rows]))
            loss = loss + fact_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            logger.info("text model step %d/%d next-piece loss %.4f readout loss %.4f fact loss %.4f (%.0fs)", step,
                        steps, lm_loss.item(), readout_loss.item(), fact_loss.item(), time.time() - t0)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (folder / "training.json").write_text(json.dumps({
        "captions": len(captions), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "final_lm_loss": float(lm_loss.item()),
        "final_readout_loss": float(readout_loss.item()), "final_fact_loss": float(fact_loss.item()),
        "system_prompt": bool(system_prompt), "seconds": round(time.time() - t0, 1)}, indent=2))
    return folder


def _caption_batch(tokenizer, captions: Sequence[str], prefix: List[int], max_length: int):
    """(ids_BT, mask_BT) of the captions for training: after `prefix` (the system prompt's ids) and cut to
    `max_length` pieces as `hart.text.encode_prompts` cuts them, or, without a prefix, between <s> and </s>."""
    if prefix:
        rows = [prefix + ids[:max_length] for ids in tokenizer(list(captions))["input_ids"]]
    else:
        rows = [[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
                for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids_BT = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask_BT = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids_BT, mask_BT


def load_text_model(folder):
    """(tokenizer, Qwen2Model) from a folder written by `train_text_model`, frozen, in eval mode."""
    from hart.loading import load_text_encoder

    tokenizer, model = load_text_encoder(folder)
    model.requires_grad_(False)
    return tokenizer, model
