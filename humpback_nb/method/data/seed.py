"""Seed data: human-written (instruction, output) pairs that start the method (paper section 2.1).

The paper takes 3,200 first turns of Open Assistant (oasst1) conversations: an English prompter
message with no parent and its assistant reply ranked best (rank 0) by people. `select_oasst1` does
exactly that on oasst1's message rows, then keeps the pairs whose reply people rated highest for
quality. Alpaca-format JSON and JSONL pairs load too; the offline default, `alpaca_en_demo`, is
model-written Alpaca-style data, unlike the paper's human-written seed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from humpback_nb.config import DataConfig
from humpback_nb.infra.files import parse_jsonl
from humpback_nb.infra.sources import SOURCES, fetch
from humpback_nb.method.data.inputs import DataError, checked_file, inner_name, read_input_text

__all__ = ["DataError", "build_seed", "drop_duplicates", "iter_json_records", "load_seed", "select_oasst1"]

OASST1_HUB_ID = "OpenAssistant/oasst1"
OASST1_FIELDS = ("message_id", "parent_id", "role", "text")
SEED_KEY = "data.seed_source"


# -- reading files with line numbers -------------------------------------------------------------
def iter_json_records(path: str | Path, key: str = SEED_KEY) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each object of a JSON array file or a JSON Lines file (.gz, .bz2, .xz allowed);
    `key` is the config key that named the file, for the error messages."""
    path = Path(path).expanduser()
    text = read_input_text(path, key)
    if inner_name(path).endswith(".json") or text.lstrip().startswith("["):
        yield from _iter_json_array(text, path)
    else:
        yield from parse_jsonl(text, path, DataError)


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Walk a JSON array element by element, so that an error can name the element's line."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}, line 1: expected a JSON array of objects")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        if pos >= len(text):
            raise DataError(f"{path}, line {line}: the JSON array is not closed")
        if text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}")
        yield line, record


def _text_field(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value.strip()


# -- the three seed formats ----------------------------------------------------------------------
def pairs_from_records(records: Iterable[tuple[int, dict[str, Any]]], path: Path, name: str) -> list[dict[str, Any]]:
    """Alpaca-style records (instruction, optional input, output) -> seed pairs."""
    pairs = []
    for line, record in records:
        where = f"{path}, line {line}"
        instruction = _text_field(record, "instruction", where)
        extra = _text_field(record, "input", where, required=False)
        output = _text_field(record, "output", where)
        pairs.append({
            "instruction": f"{instruction}\n\n{extra}" if extra else instruction,
            "output": output,
            "source": f"{name}:{line}",
        })
    return pairs


def _quality(row: dict[str, Any]) -> float | None:
    """The human `quality` label of an oasst1 message (0-1), if it has one."""
    labels = row.get("labels") or {}
    names, values = labels.get("name") or [], labels.get("value") or []
    for label, value in zip(names, values, strict=False):
        if label == "quality" and value is not None:
            return float(value)
    return None


def select_oasst1(rows: Iterable[dict[str, Any]], n: int, lang: str = "en", min_quality: float = 0.5,
                  where: str = "oasst1") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """First turns of oasst1 trees: English root prompt + its rank-0 reply, best `quality` first.

    Returns (pairs, counts of what was dropped and why).
    """
    rows = list(rows)
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for index, row in enumerate(rows, start=1):
        missing = [key for key in OASST1_FIELDS if key not in row]
        if missing:
            raise DataError(f"{where}, row {index}: not an oasst1 message row (missing {missing[0]!r})")
        if row["parent_id"] is not None:
            children[row["parent_id"]].append(row)
    counts: dict[str, int] = defaultdict(int)
    pairs = []
    for root in rows:
        if root["parent_id"] is not None or root["role"] != "prompter":
            continue
        counts["first turns"] += 1
        if root.get("lang") != lang:
            counts[f"not {lang}"] += 1
            continue
        if root.get("deleted") or root.get("review_result") is False:
            counts["prompt deleted or failed review"] += 1
            continue
        best = [c for c in children[root["message_id"]]
                if c["role"] == "assistant" and c.get("rank") == 0 and not c.get("deleted")]
        if not best:
            counts["no rank-0 reply"] += 1
            continue
        reply = best[0]
        quality = _quality(reply)
        if quality is None or quality < min_quality:
            counts[f"reply quality below {min_quality}"] += 1
            continue
        if not root["text"].strip() or not reply["text"].strip():
            counts["empty text"] += 1
            continue
        pairs.append({"instruction": root["text"].strip(), "output": reply["text"].strip(),
                      "source": f"oasst1:{reply['message_id']}", "quality": quality})
    pairs.sort(key=lambda p: (-p["quality"], p["source"]))
    pairs, counts["duplicates_dropped"] = drop_duplicates(pairs)
    counts["kept"] = min(n, len(pairs))
    counts["beyond the top N"] = max(0, len(pairs) - n)
    return pairs, dict(counts)


def load_oasst1_rows(source: str) -> tuple[list[dict[str, Any]], str]:
    """oasst1 message rows from the hub (`oasst1`, needs internet) or from a JSONL / parquet file."""
    if source == "oasst1":
        import datasets

        from humpback_nb.infra.sources import from_hub

        with from_hub(OASST1_HUB_ID, SEED_KEY, "a local file of oasst1 message rows (JSONL or parquet)"):
            table = datasets.load_dataset(OASST1_HUB_ID, split="train")
        return table.to_list(), OASST1_HUB_ID
    path = checked_file(source, SEED_KEY)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist(), str(path)
        except pyarrow.ArrowException as err:
            raise DataError(f"{path}: not a readable parquet file ({err}) ({SEED_KEY})") from None
    return [record for _, record in iter_json_records(path)], str(path)


def is_oasst1_row(record: dict[str, Any]) -> bool:
    return all(key in record for key in OASST1_FIELDS)


def load_seed(data: DataConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All usable seed pairs of `data.seed_source`, best first for oasst1, file order otherwise."""
    source = data.seed_source
    if source in SOURCES:
        path = fetch(source)
        return pairs_from_records(iter_json_records(path), path, source), {}
    if source == "oasst1" or source.endswith(".parquet"):
        rows, where = load_oasst1_rows(source)
        return select_oasst1(rows, data.seed_size, data.seed_lang, data.seed_min_quality, where)
    path = Path(source).expanduser()
    records = list(iter_json_records(path))
    if records and is_oasst1_row(records[0][1]):
        return select_oasst1((r for _, r in records), data.seed_size, data.seed_lang, data.seed_min_quality,
                             str(path))
    return pairs_from_records(records, path, path.name), {}


def build_seed(data: DataConfig, random_seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The seed pairs of a run: `seed_size` training pairs (split "train") and `heldout_size` held-out ones
    (split "heldout"), with ids.

    oasst1 pairs come best-quality first, so the training pairs are the top N and the held-out ones the
    next best; other sources are shuffled with `random_seed` first. A pair that repeats an earlier one
    (whitespace aside) is dropped and counted (`duplicates_dropped`); fewer usable pairs than the two sizes
    ask for is a DataError with both counts.
    """
    pairs, counts = load_seed(data)
    pairs, duplicates = drop_duplicates(pairs)
    counts = {**counts, "duplicates_dropped": counts.get("duplicates_dropped", 0) + duplicates}
    if len(pairs) < data.seed_size + data.heldout_size:
        raise DataError(_too_few(data, len(pairs), counts))
    if "quality" not in pairs[0]:
        random.Random(random_seed).shuffle(pairs)
    train = pairs[: data.seed_size]
    heldout = pairs[data.seed_size : data.seed_size + data.heldout_size]
    records = []
    for split, chosen in (("train", train), ("heldout", heldout)):
        for pair in chosen:
            records.append({"id": f"seed-{len(records):05d}", "split": split, **pair})
    counts = {**counts, "train": len(train), "heldout": len(heldout), "available": len(pairs)}
    return records, counts


def drop_duplicates(pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the pairs without repeats, how many were dropped): a pair whose instruction and output equal an earlier
    pair's, whitespace aside, is a repeat; the first one stays."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in pairs:
        key = (" ".join(pair["instruction"].split()), " ".join(pair["output"].split()))
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept, len(pairs) - len(kept)


def _too_few(data: DataConfig, usable: int, counts: dict[str, int]) -> str:
    """The error of a seed source with fewer usable pairs than the run asks for, with both counts."""
    dropped = {("duplicates" if k == "duplicates_dropped" else k): v for k, v in counts.items()
               if v and k not in ("kept", "first turns", "beyond the top N")}
    why = f" (dropped: {', '.join(f'{k} {v:,}' for k, v in dropped.items())})" if dropped else ""
    oasst1 = ", lower data.seed_min_quality" if "first turns" in counts else ""
    wanted = data.seed_size + data.heldout_size
    return (f"{data.seed_source}: {usable:,} usable seed pairs{why}, fewer than the {wanted:,} that data.seed_size"
            f" ({data.seed_size:,}) + data.heldout_size ({data.heldout_size:,}) ask for: lower "
            f"data.seed_size or data.heldout_size{oasst1}, or name a larger data.seed_source")
