"""diffusers-style pipelines for HART."""
from pipelines.pipeline_hart import HARTPipeline
from pipelines.pipeline_hart_edit import HARTInpaintPipeline, HARTVariationPipeline

__all__ = ["HARTPipeline", "HARTInpaintPipeline", "HARTVariationPipeline"]
