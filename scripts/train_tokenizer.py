"""Train HART's hybrid tokenizer from scratch, or fine-tune one, on a folder of images.

From scratch:  python scripts/train_tokenizer.py --model_config tok.json --data_dir DATA --output_dir OUT
Fine-tune:     python scripts/train_tokenizer.py --pretrained PIPE_OR_TOKENIZER --data_dir DATA --output_dir OUT
Several processes: prefix with `accelerate launch` (any config), see docs/training.md.
The result, OUT/tokenizer, loads with `HybridTokenizer.from_pretrained`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `hart` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hart.training.cli import tokenizer_parser as build_parser, tokenizer_main as main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
