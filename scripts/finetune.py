"""Fine-tune HART on a folder of captioned images.

One process:        python scripts/finetune.py --pretrained PIPE --data_dir DATA --output_dir OUT
Several (any accelerate config: DDP, FSDP, multi-node):
                    accelerate launch [--config_file configs/accelerate_fsdp.yaml] scripts/finetune.py ...
Two CPU processes:  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py ...

See docs/training.md. The global batch is batch_size x processes x grad_accum images per step.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `hart` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hart.training.cli import finetune_parser as build_parser, finetune_main as main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
