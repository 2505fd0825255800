"""HART: hybrid autoregressive text-to-image generation in plain PyTorch.

Names are imported on first use, so that light modules (`hart.data`, `hart.eval`, the CLI's
argument parsing) start without loading diffusers and transformers.
"""
import logging
from importlib import import_module

# Import-time notices of optional libraries that say nothing about this package's work. With torchao
# (the `int8` extra) installed, importing diffusers imports torchao, which reports its CUDA-only kernel
# libraries as unloadable on a CPU build of torch and registers enums the way torch 2.13 deprecates,
# and diffusers reports tensor classes that torchao has moved: five lines before every CLI message.
_IMPORT_NOTICES = {
    "torchao": "Failed to load ",
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}
for _logger, _start in _IMPORT_NOTICES.items():
    logging.getLogger(_logger).addFilter(lambda record, start=_start: not str(record.msg).startswith(start))

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
