"""Writing files safely, for every command: where an output may go (checked before the work that
produces it), atomic replacement, flushing to disk, and content hashes.

A complete checkpoint is a directory holding its manifest (written last, ``checkpoint.py``); no
output may land inside one, since a checkpoint holds exactly the files its manifest lists.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint directory: its manifest, written last, exists."""
    return path.is_dir() and (path / MANIFEST).is_file()


def enclosing_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint directory that ``path`` is or lies in (at any depth), or ``None``."""
    resolved = Path(path).resolve()
    return next((parent for parent in (resolved, *resolved.parents) if is_checkpoint(parent)), None)


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(path: str | Path, flag: str, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Create ``path``'s directory and make sure a file can be written there, before the work
    that produces it; return ``path``. ``inputs`` maps what the command reads (by the name a user
    gave it: ``"SAMPLES"``, ``"--dense"``) to its path: ``path`` may be none of them, under any
    name (the same file by its resolved path, a hard link or a symlink). A failure is a
    ``ValueError`` naming ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    for name, given in (inputs or {}).items():
        if given is not None and same_file(path, Path(given)):
            raise ValueError(
                f"{flag} {path} is {name} {given}, which this command reads: writing it would destroy it; "
                "give another file"
            )
    _probe(path.parent, path, flag)
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: one path resolved, a hard link, or a symlink."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only their resolved paths can match
        return a.resolve() == b.resolve()


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
