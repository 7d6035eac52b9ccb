"""What the command-line tools share: argument types that reject bad numbers while parsing (an
argparse error, exit code 2, before any work) by the rules of ``moe_kernels.validation``, the
flags several tools take, and the checks that an output can be written before the work that
produces it."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from moe_kernels.backend import BACKENDS
from moe_kernels.validation import (
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


def check_writable(path: str | Path, flag: str) -> Path:
    """Create ``path``'s directory and make sure a file can be written there, before the work
    that produces it; return ``path``. A failure is a ``ValueError`` naming ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    _probe(path.parent, path, flag)
    return path


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create the directory ``path`` if need be and make sure files can be written in it; return
    ``path``. A failure is a ``ValueError`` naming ``flag``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    _probe(path, path, flag)
    return path


def _probe(directory: Path, path: Path, flag: str) -> None:
    """Refuse ``path`` inside a checkpoint, create ``directory`` and write a temporary file in
    it; a failure is a ``ValueError`` naming ``flag`` and ``path``."""
    check_outside_checkpoints(path, flag)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".writable.", delete=True):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be written: {error.strerror or error}") from error


def check_outside_checkpoints(path: Path, flag: str) -> None:
    """Refuse an output inside a training checkpoint: a checkpoint holds exactly the files its
    manifest lists, so one more file would make it fail verification (and one rewritten would
    destroy it)."""
    from .checkpoint import enclosing_checkpoint  # checkpoint imports this module

    checkpoint = enclosing_checkpoint(path)
    if checkpoint is not None:
        raise ValueError(
            f"{flag} {path} lies inside the checkpoint {checkpoint}, which must hold only the files of "
            "its manifest; write it elsewhere"
        )


def replace_atomically(write: Callable[[Path], None], path: Path) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``, so
    that a failure never leaves a half-written ``path``. The file gets the permissions of any
    other new file (``mkstemp`` would leave it readable by its owner only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_file_mode() -> int:
    """The permissions ``open()`` gives a new file: ``0o666`` less the process's umask."""
    umask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(umask)
    return 0o666 & ~umask
