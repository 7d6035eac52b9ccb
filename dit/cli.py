"""What the command-line tools share: argument types that reject bad numbers while parsing (an
argparse error, exit code 2, before any work) by the rules of ``moe_kernels.rules``, and the
flags several tools take. Where outputs may go and how they are written is ``files.py``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from moe_kernels import BACKENDS
from moe_kernels.rules import (
    COEFFICIENT,
    NONNEGATIVE_INT,
    OFFSET,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    SCALE,
    Rule,
)


def argument_type(rule: Rule) -> Callable[[str], int | float]:
    """An argparse ``type`` that accepts exactly what ``rule`` accepts: the same rule the Python
    API applies to the same number, so the two never disagree."""

    def parse(text: str) -> int | float:
        try:
            return rule.check("value", int(text) if rule.integer else float(text))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {rule.wanted}, got {text!r}") from None

    parse.rule = rule
    return parse


# A seed: what torch, NumPy and random all accept.
SEED = Rule(integer=True, low=0, high=2**32 - 1)

positive_int = argument_type(POSITIVE_INT)
nonnegative_int = argument_type(NONNEGATIVE_INT)
positive_float = argument_type(POSITIVE)
coefficient = argument_type(COEFFICIENT)
fraction = argument_type(PROBABILITY)
seed = argument_type(SEED)
shift = argument_type(SCALE)
offset = argument_type(OFFSET)


def add_moe_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--moe-backend",
        choices=BACKENDS,
        default="auto",
        help="moe_kernels backend: auto (Triton on CUDA, PyTorch elsewhere), triton or torch",
    )


def explicit_arguments(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> set[str]:
    """The destinations that ``argv`` sets itself, as opposed to those left at their defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
