"""Training: the HART objective, captioned-image data and its cache, transformer fine-tuning
(full or LoRA, on any accelerate set-up) and hybrid tokenizer training (see docs/training.md).

Modules are imported on demand (`hart.training.finetune`, `hart.training.tokenizer_training`, ...),
so the objective stays importable without the training-only dependencies (peft).
"""
