"""Atomic writes and JSONL records: a file in a run folder is either whole or absent.

Every write goes to a temporary name in the same folder, is flushed to disk, and is renamed into
place; a rename within one file system is atomic, so a reader (or a rerun after a crash) never sees
half a file. Folders (model adapters) are written the same way.

In a launch of several processes every process runs each stage, and only the main one may write the
run folder: the others run it inside `discard_writes(run_folder)`, where these writes go to a scratch
place that is deleted at once (see distributed.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DISCARDED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("discarded", default=())


@contextlib.contextmanager
def discard_writes(folder: str | Path) -> Iterator[None]:
    """Inside this block, atomic writes to anything under `folder` are made in a scratch folder and dropped."""
    token = _DISCARDED.set((*_DISCARDED.get(), Path(folder).resolve()))
    try:
        yield
    finally:
        _DISCARDED.reset(token)


def _discarded(path: Path) -> bool:
    target = path.resolve()
    return any(target.is_relative_to(folder) for folder in _DISCARDED.get())


@contextlib.contextmanager
def _scratch(name: str) -> Iterator[Path]:
    scratch = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    try:
        yield scratch / name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    if _discarded(path):
        with _scratch(path.name) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """Write `value` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    if _discarded(path):
        with _scratch(path.name) as tmp:
            tmp.mkdir()
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(lock: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (made if missing) while the block runs: another process asking for
    it waits until then. For work that two processes may start at once on one cache (a test run's workers, a launch's
    processes), which must be done once and read whole."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process ends
        yield


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON Lines atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


class RecordError(ValueError):
    """A malformed record file; the message names the file, the line and the problem."""


def decode_text(raw: bytes, path: str | Path, error: type[ValueError] = RecordError) -> str:
    """UTF-8 text of a file's bytes; undecodable bytes raise `error` naming the file and the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


MAX_LINE_CHARS = 16 * 2**20  # a record longer than this is not a segment or a pair but a broken file


def parse_jsonl(text: str, path: str | Path, error: type[ValueError] = RecordError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises `error` naming the file and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise error(f"{path}, line {number}: {len(line):,} characters on one line, more than the "
                        f"{MAX_LINE_CHARS:,} a record may have (is this JSON Lines, one object per line?)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise error(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON Lines, one object per non-blank line, with errors that name file and line."""
    path = Path(path)
    return [record for _, record in parse_jsonl(decode_text(path.read_bytes(), path), path)]


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove leftovers of writes that were interrupted (files and folders named `.tmp-*`)."""
    removed = []
    for leftover in Path(folder).glob(f"{TMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
