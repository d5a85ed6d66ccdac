"""Input files a config names (seed pairs, corpora, Table 7's labels), opened with one clear line for each way
they fail: missing, a folder, no permission, empty, not the compressed file its name says, cut short.

Files ending in .gz, .bz2 or .xz are decompressed; .zst is refused with what to do (Python reads zstd only
from 3.14, or with the zstandard package). Every error is a `DataError` that names the file, the problem and
the config key that named the file.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from humpback_nb.infra.files import RecordError, decode_text


class DataError(RecordError):
    """Input data that cannot be used; the message names the file, the line and the problem."""


# suffix -> (name of the format, the bytes every such file starts with, how to open it)
COMPRESSED = {
    ".gz": ("gzip", b"\x1f\x8b", gzip.open),
    ".bz2": ("bzip2", b"BZh", bz2.open),
    ".xz": ("xz", b"\xfd7zXZ\x00", lzma.open),
}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# what a damaged or cut-off compressed file raises while it is read
_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def inner_name(path: str | Path) -> str:
    """The file's name in lower case without its compression suffix: "Pairs.JSONL.gz" -> "pairs.jsonl"."""
    name = Path(path).name.lower()
    for suffix in (*COMPRESSED, ".zst"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def checked_file(path: str | Path, key: str) -> Path:
    """`path` if it is a readable, non-empty file; else DataError naming it, the problem and `key`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file ({key})")
    if not path.exists():
        raise DataError(f"{path}: no such file ({key})")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except PermissionError:
        raise DataError(f"{path}: permission denied, the file cannot be read ({key})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}) ({key})") from None
    if not head:
        raise DataError(f"{path}: empty file ({key})")
    suffix = Path(path).suffix.lower()
    if suffix == ".zst":
        problem = ("a zstd file, which the kit does not read: decompress it (zstd -d) or recompress it as .gz"
                   if head.startswith(ZSTD_MAGIC) else "not a zstd file, though its name ends in .zst")
        raise DataError(f"{path}: {problem} ({key})")
    if suffix in COMPRESSED:
        kind, magic, _ = COMPRESSED[suffix]
        if not head.startswith(magic):
            raise DataError(f"{path}: not a {kind} file, though its name ends in {suffix} ({key})")
    return path


@contextlib.contextmanager
def open_input(path: str | Path, key: str) -> Iterator[BinaryIO]:
    """The file as a binary stream, decompressed by its suffix; a damaged or cut-off compressed file raises
    DataError while it is read (for files too large to read at once, such as MediaWiki dumps)."""
    path = checked_file(path, key)
    suffix = path.suffix.lower()
    kind, _, opener = COMPRESSED.get(suffix, ("", b"", open))
    with opener(path, "rb") as handle:
        try:
            yield handle
        except _DECOMPRESS_ERRORS as err:
            raise _damaged(path, kind, err, key) from None


def read_input(path: str | Path, key: str) -> bytes:
    """The bytes of an input file, decompressed by its suffix (.gz, .bz2, .xz)."""
    with open_input(path, key) as handle:
        raw = handle.read()
    if not raw:
        raise DataError(f"{Path(path).expanduser()}: empty once decompressed ({key})")
    return raw


def read_input_text(path: str | Path, key: str) -> str:
    """The UTF-8 text of an input file (decompressed); bytes that are not UTF-8 name the file and the line."""
    path = Path(path).expanduser()
    return decode_text(read_input(path, key), path, DataError)


def _damaged(path: Path, kind: str, err: BaseException, key: str) -> DataError:
    if not kind:
        return DataError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err}) ({key})")
    if isinstance(err, EOFError):
        return DataError(f"{path}: the {kind} data ends early, the file is cut short (an unfinished download?) "
                         f"({key})")
    return DataError(f"{path}: damaged {kind} data ({err}) ({key})")
