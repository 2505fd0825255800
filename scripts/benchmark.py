"""Same as `hart benchmark ...`: time generation stage by stage (see `hart benchmark --help`).

    python scripts/benchmark.py --config hart-0.7b-1024 --dtype bf16 --device cuda --batch-size 1 --batch-size 8
"""
import sys

from hart.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
