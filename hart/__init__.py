"""HART: hybrid autoregressive text-to-image generation in plain PyTorch.

Names are imported on first use, so that light modules (`hart.data`, `hart.eval`, the CLI's
argument parsing) start without loading diffusers and transformers.
"""
from importlib import import_module

_EXPORTS = {
    "HARTPipeline": "hart.pipelines",
    "HARTInpaintPipeline": "hart.pipelines",
    "HARTVariationPipeline": "hart.pipelines",
    "HARTTransformer": "hart.models.transformer",
    "HybridTokenizer": "hart.models.tokenizer",
    "ForcedTokens": "hart.sampling",
    "sample_scales": "hart.sampling",
    "SYSTEM_PROMPT": "hart.text",
    "TextConditioning": "hart.text",
    "encode_prompts": "hart.text",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hart' has no attribute {name!r}")
