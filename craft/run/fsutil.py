"""Atomic file and folder writes: a reader (another stage, the studio, a resumed run) sees either
the old content or the whole new one, never a torn file or a half-copied folder.

Why it matters here: every stage can be killed at any moment (a cancelled job, a SIGKILLed rank,
a preempted node) and the next run trusts what it finds on disk: a checkpoint folder that exists
is complete, an image that exists decodes, RUN/final is a loadable pipeline.

The recipe: write beside the target under a name starting with :data:`TMP_PREFIX` (so leftovers
are recognisable), flush and fsync, then ``os.replace`` / ``rename`` over the target; for a
folder, the old one is moved aside first and removed after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (not supported on every platform or filesystem)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb", fsync: bool = True,
                encoding: str | None = None) -> Iterator:
    """Yield a file object beside ``target``; on success it replaces ``target`` atomically,
    on an exception it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=target.suffix, dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_file(target, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(target)


def save_image_atomic(image, target: str | os.PathLike, fsync: bool = True, **save_kw) -> Path:
    """``image.save`` (a PIL image) through :func:`atomic_file`; the format follows the suffix
    unless ``format=`` is given."""
    target = Path(target)
    save_kw.setdefault("format", {".jpg": "JPEG", ".jpeg": "JPEG"}.get(target.suffix.lower(),
                                                                       "PNG"))
    with atomic_file(target, "wb", fsync=fsync) as f:
        image.save(f, **save_kw)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; fill it, and on success it becomes
    ``target`` (replacing any previous one). On an exception it is removed and ``target`` is
    left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def replace_dir(src: Path, target: Path) -> Path:
    """Move the finished folder ``src`` to ``target``; an existing ``target`` is moved aside
    first (so at every moment one complete version exists under one of the two names) and then
    deleted."""
    old = target.with_name(f"{TMP_PREFIX}old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    src.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def copy_dir_atomic(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy the folder ``src`` to ``target`` so that ``target`` is never seen half-copied."""
    with atomic_dir(target) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(target)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")


def fingerprint(path: str | os.PathLike) -> str:
    """What identifies a model's files on disk without reading them: the names, sizes and
    modification times of its weight and config files (a retrained model at the same path gets
    another fingerprint; a copy made with shutil.copytree keeps it). A path that does not
    exist (a hub id) is its own fingerprint."""
    p = Path(path)
    if not p.exists():
        return str(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*")
                                            if q.is_file() and q.suffix in WEIGHT_SUFFIXES)
    return ";".join(f"{q.relative_to(p) if p.is_dir() else q.name}:{q.stat().st_size}:"
                    f"{q.stat().st_mtime_ns}" for q in files)


__all__ = ["TMP_PREFIX", "fingerprint", "atomic_dir", "atomic_file", "copy_dir_atomic", "fsync_dir",
           "replace_dir", "save_image_atomic", "write_text_atomic"]
