"""HART: hybrid autoregressive text-to-image generation in plain PyTorch.

The model classes are importable from here (diffusers' `model_index.json` records components by
package and class name, so `hart` must expose them together with `ModelMixin`).
"""
from diffusers import ModelMixin  # noqa: F401  (diffusers looks it up in the component's package)

from hart.models.tokenizer import HybridTokenizer
from hart.models.transformer import HARTTransformer
from hart.sampling import ForcedTokens, sample_scales
from hart.text import SYSTEM_PROMPT, TextConditioning, encode_prompts

__all__ = [
    "HARTPipeline", "HARTTransformer", "HybridTokenizer", "ForcedTokens", "sample_scales",
    "SYSTEM_PROMPT", "TextConditioning", "encode_prompts",
]


def __getattr__(name):
    # The pipeline lives in `pipelines/` and imports this package: import it on first use.
    if name == "HARTPipeline":
        from pipelines import HARTPipeline

        return HARTPipeline
    raise AttributeError(f"module 'hart' has no attribute {name!r}")
