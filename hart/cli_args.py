"""Argument helpers shared by the `hart` sub-commands."""
from __future__ import annotations

import argparse

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(Exception):
    """Bad command-line input: reported as a one-line message, exit status 2."""


def checked(kind, ok, what: str):
    """An argparse `type=` that parses with `kind` and rejects values failing `ok`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "a positive integer")
