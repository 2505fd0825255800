"""diffusers-style pipelines for HART."""
from pipelines.pipeline_hart import HARTPipeline

__all__ = ["HARTPipeline"]
