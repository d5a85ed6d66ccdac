"""The data stages of a run: `seed` writes seed.jsonl, `segments` writes segments.jsonl."""

from __future__ import annotations

import hashlib
from collections import Counter

from humpback_nb.infra.files import atomic_write_json, write_jsonl
from humpback_nb.method.data.filters import apply_filters
from humpback_nb.method.data.seed import DataError, build_seed
from humpback_nb.method.data.segments import read_documents, segment_documents


def seed_stage(ctx) -> dict:
    """seed.jsonl: the training seed pairs (split "train") and a few held-out ones (split "heldout")."""
    records, counts = build_seed(ctx.config.data, ctx.config.random_seed)
    write_jsonl(ctx.path("seed.jsonl"), records)
    return counts


def _sample_key(seed: int, segment_id: str) -> str:
    return hashlib.sha256(f"{seed}:{segment_id}".encode()).hexdigest()


def segments_stage(ctx) -> dict:
    """segments.jsonl (kept), segments_dropped.jsonl (with the filter and reason), segments_report.json."""
    data = ctx.config.data
    if not data.corpus_sources:
        raise DataError("data.corpus_sources is empty: name the corpora (files, folders, embedded names) to segment")
    documents = Counter()
    segments = []
    for source in data.corpus_sources:
        for segment in segment_documents(_counted(read_documents(source), documents, source), data.max_chars):
            segments.append({"id": f"seg-{len(segments):06d}", **segment})
    kept, dropped, funnel = apply_filters(segments, data)
    # The paper samples its 502k segments from what passed the filters; sampling by a seeded hash of
    # the id keeps the choice stable when the corpus grows, and the output stays in corpus order.
    chosen = set(sorted((s["id"] for s in kept), key=lambda i: _sample_key(ctx.config.random_seed, i))[: data.num_segments])
    sampled = [dict(s, chars=len(s["text"])) for s in kept if s["id"] in chosen]
    funnel.append({"step": "sampled", "count": len(sampled), "removed": len(kept) - len(sampled)})
    report = {
        "documents": dict(documents),
        "funnel": [{"step": "documents", "count": sum(documents.values()), "removed": 0}, *funnel],
        "segments_by_source": dict(Counter(s["source"].split(":")[0] for s in sampled)),
    }
    write_jsonl(ctx.path("segments_dropped.jsonl"), dropped)
    atomic_write_json(ctx.path("segments_report.json"), report)
    write_jsonl(ctx.path("segments.jsonl"), sampled)
    return report


def _counted(documents, counter: Counter, source: str):
    for document in documents:
        counter[source] += 1
        yield document
