"""The paper's segment filters (section 3.1), each returning what it kept and what it dropped, and why.

In the order `apply_filters` runs them (cheap first, deduplication last so that a duplicate of a
dropped segment does not count):
  header     empty, all-uppercase, or navigation headers ("advertisement", "forum", ...)
  length     outside min_chars..max_chars characters (600-3,000 in the paper)
  repeated   two sentences of one segment that are near copies (word n-gram Jaccard)
  exact      the same text (case and whitespace aside) as an earlier segment
  near       an estimated word 5-gram Jaccard with an earlier segment above the threshold (MinHash LSH)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sized
from itertools import combinations
from typing import Any, TypeVar

from humpback_nb.config import DataConfig
from humpback_nb.infra.distributed import processes
from humpback_nb.infra.progress import tqdm

Record = dict[str, Any]
FilterResult = tuple[list[Record], list[Record]]
T = TypeVar("T")

# The settings that decide what each filter drops: what to change when a filter drops too much.
FILTER_KEYS = {"header": "data.navigation_headers", "length": "data.min_chars, data.max_chars",
               "repeated": "data.repeated_sentence_jaccard", "exact": None, "near": "data.near_duplicate_jaccard"}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")


def progress_bar(items: Iterable[T], desc: str, unit: str = "segment", show: bool = True) -> Iterable[T]:
    """`items` with a progress bar (tqdm.auto: stderr, or a widget in a notebook) on the main process; no bar
    for an empty list. tqdm redraws at most ten times a second, so a loop of many small steps stays as fast."""
    total = len(items) if isinstance(items, Sized) else None
    if not show or total == 0 or not processes().is_main:
        return items
    return tqdm(items, desc=desc, unit=unit, total=total)


def _dropped(record: Record, name: str, reason: str) -> Record:
    return {**record, "filter": name, "reason": reason}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is its one (shorter) n-gram."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


# -- the filters ---------------------------------------------------------------------------------
def header_filter(segments: list[Record], navigation: list[str]) -> FilterResult:
    """Drop segments whose header is empty, all uppercase, or navigation. Headerless text passes."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(n.lower()) for n in navigation) + r")s?\b") if navigation else None
    kept, dropped = [], []
    for segment in segments:
        header = segment.get("header")
        if header is None:
            kept.append(segment)
            continue
        letters = [c for c in header if c.isalpha()]
        found = pattern.search(header.lower()) if pattern else None
        if not letters:
            dropped.append(_dropped(segment, "header", "empty header"))
        elif len(letters) > 1 and all(c.isupper() for c in letters):
            dropped.append(_dropped(segment, "header", f"all-uppercase header {header!r}"))
        elif found:
            dropped.append(_dropped(segment, "header", f"navigation header {header!r} ({found.group(1)!r})"))
        else:
            kept.append(segment)
    return kept, dropped


def length_filter(segments: list[Record], min_chars: int, max_chars: int) -> FilterResult:
    """Keep segments of min_chars..max_chars characters."""
    kept, dropped = [], []
    for segment in segments:
        size = len(segment["text"])
        if size < min_chars:
            dropped.append(_dropped(segment, "length", f"too short ({size} < {min_chars} characters)"))
        elif size > max_chars:
            dropped.append(_dropped(segment, "length", f"too long ({size} > {max_chars} characters)"))
        else:
            kept.append(segment)
    return kept, dropped


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def repeated_sentence_filter(segments: list[Record], threshold: float, n: int = 3,
                             min_words: int = 4, progress: bool = False) -> FilterResult:
    """Drop segments in which two sentences (of at least `min_words` words) have n-gram Jaccard >= threshold."""
    kept, dropped = [], []
    for segment in progress_bar(segments, "filter: repeated sentences", show=progress):
        grams = [(s, ngrams(w, n)) for s in sentences(segment["text"]) if len(w := words(s)) >= min_words]
        repeat = next(((a, b, j) for (a, ga), (b, gb) in combinations(grams, 2)
                       if (j := jaccard(ga, gb)) >= threshold), None)
        if repeat:
            a, b, score = repeat
            reason = f"repeated sentences (Jaccard {score:.2f}): {_clip(a)!r} ~ {_clip(b)!r}"
            dropped.append(_dropped(segment, "repeated", reason))
        else:
            kept.append(segment)
    return kept, dropped


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def exact_duplicate_filter(segments: list[Record]) -> FilterResult:
    """Drop segments whose text (case and whitespace aside) an earlier segment already has."""
    first: dict[str, Record] = {}
    kept, dropped = [], []
    for segment in segments:
        key = hashlib.sha1(_normal(segment["text"]).encode()).hexdigest()
        if key in first:
            dropped.append(_dropped(segment, "exact", f"exact duplicate of {first[key]['id']}"))
        else:
            first[key] = segment
            kept.append(segment)
    return kept, dropped


def near_duplicate_filter(segments: list[Record], threshold: float, n: int = 5, num_perm: int = 128,
                          seed: int = 1, progress: bool = False) -> FilterResult:
    """Drop segments that nearly copy an earlier one: MinHash LSH finds candidates, exact Jaccard decides."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    shingles: dict[str, set] = {}
    kept, dropped = [], []
    for segment in progress_bar(segments, "filter: near duplicates (MinHash)", show=progress):
        grams = ngrams(words(segment["text"]), n)
        signature = MinHash(num_perm=num_perm, seed=seed)
        signature.update_batch([" ".join(g).encode() for g in grams])
        match = None
        for candidate in lsh.query(signature):
            score = jaccard(grams, shingles[candidate])
            if score >= threshold and (match is None or score > match[1]):
                match = (candidate, score)
        if match:
            dropped.append(_dropped(segment, "near", f"near duplicate of {match[0]} (Jaccard {match[1]:.2f})"))
        else:
            lsh.insert(segment["id"], signature)
            shingles[segment["id"]] = grams
            kept.append(segment)
    return kept, dropped


def _clip(text: str, size: int = 60) -> str:
    return text if len(text) <= size else text[: size - 3] + "..."


# -- all of them, in order -----------------------------------------------------------------------
def filters(data: DataConfig, progress: bool = False) -> list[tuple[str, Callable[[list[Record]], FilterResult]]]:
    """The filters with the thresholds of `data`, in the order they run; with `progress`, the two slow ones
    (repeated sentences, near duplicates) show a bar."""
    return [
        ("header", lambda s: header_filter(s, data.navigation_headers)),
        ("length", lambda s: length_filter(s, data.min_chars, data.max_chars)),
        ("repeated", lambda s: repeated_sentence_filter(s, data.repeated_sentence_jaccard,
                                                         data.repeated_sentence_ngram, progress=progress)),
        ("exact", exact_duplicate_filter),
        ("near", lambda s: near_duplicate_filter(s, data.near_duplicate_jaccard, data.near_duplicate_ngram,
                                                 data.minhash_permutations, progress=progress)),
    ]


def apply_filters(segments: list[Record], data: DataConfig,
                  progress: bool = False) -> tuple[list[Record], list[Record], list[dict]]:
    """(kept, dropped with reasons, funnel): the funnel counts the segments left after each filter."""
    funnel = [{"step": "segments", "count": len(segments), "removed": 0}]
    dropped_all: list[Record] = []
    for name, keep in filters(data, progress):
        segments, dropped = keep(segments)
        dropped_all.extend(dropped)
        funnel.append({"step": name, "count": len(segments), "removed": len(dropped)})
    return segments, dropped_all, funnel
