"""Argument limits shared by the pipelines, the command line and the app (import-light on purpose)."""

MAX_GUIDANCE_SCALE = 1000.0  # far beyond any useful value; larger ones overflow the guided logits
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; image i of a run uses seed + i
