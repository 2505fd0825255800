"""diffusers-style pipelines for HART."""
from hart.pipelines.pipeline_hart import HARTPipeline
from hart.pipelines.pipeline_hart_edit import HARTInpaintPipeline, HARTVariationPipeline

__all__ = ["HARTPipeline", "HARTInpaintPipeline", "HARTVariationPipeline"]
