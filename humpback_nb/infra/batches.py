"""Resumable work in batches, shared by several processes: `in_batches` and its part files.

A long loop (generation, rating) is cut into batches with a fixed composition. With a `.partial` file, each
finished batch is appended there and a rerun after an interruption computes only the batches missing there,
with the same composition, so the result equals an uninterrupted run's, without duplicates or gaps. Launched
on several processes, each takes every N-th batch and keeps its own part file beside the `.partial` one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from humpback_nb.infra.distributed import gather, processes
from humpback_nb.infra.progress import tqdm


def read_partial(path: Path | None, truncate: bool = True) -> dict[str, dict[str, Any]]:
    """Records already generated, by id. A last line cut short by a crash is ignored and, with `truncate`,
    dropped from the file (only the process that appends to a file may truncate it)."""
    if path is None or not path.is_file():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if truncate and len(complete) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = {}
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["id"]] = record
    return records


def part_file(partial: Path, rank: int) -> Path:
    """The part file of process `rank` in a launch of several processes, beside `partial`."""
    return partial.with_name(f"{partial.name.removesuffix('.partial')}.rank{rank}.partial")


def read_partials(partial: Path | None, own: Path | None) -> dict[str, dict[str, Any]]:
    """Records in `partial` and in the part files of every process (of this or an earlier launch)."""
    if partial is None:
        return {}
    records: dict[str, dict[str, Any]] = {}
    for path in [partial, *sorted(partial.parent.glob(part_file(partial, 0).name.replace(".rank0.", ".rank*.")))]:
        records.update(read_partial(path, truncate=path == own))
    return records


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def in_batches(ids: Sequence[str], batches: Sequence[Sequence[int]],
               compute: Callable[[int, Sequence[int]], list[dict[str, Any]]], partial: Path | None = None,
               progress: bool = True, desc: str = "", unit: str = "prompt", workers: int = 1) -> list[dict[str, Any]]:
    """One record per id, in the order of `ids`, made a batch at a time by `compute(number, batch)` (one record
    with its "id" per index of the batch).

    With `partial`, every finished batch is appended there, and batches whose records are all there are
    skipped: a rerun after a crash computes only what is missing, with the same batches as before. In a launch
    of several processes, batch b is process (b mod N)'s, each appends to its own part file, and at the end
    every process holds every record. With `workers` > 1, that many batches are computed at once in threads (for
    work that waits on an endpoint); each is appended as it finishes, and the first error stops the rest.
    """
    where = processes()
    wanted = set(ids)
    own = (partial if where.world == 1 else part_file(partial, where.rank)) if partial is not None else None
    done = {key: value for key, value in read_partials(partial, own).items() if key in wanted}
    bar = tqdm(total=len(ids), initial=len(done), desc=desc, disable=not progress or not where.is_main, unit=unit)
    made: list[dict[str, Any]] = []
    todo = [(number, batch) for number, batch in enumerate(batches)
            if where.owns(number) and not all(ids[i] in done for i in batch)]

    def keep(records: list[dict[str, Any]]) -> None:
        new = [record for record in records if record["id"] not in done]
        if own is not None:
            append_records(own, new)
        done.update((r["id"], r) for r in new)
        made.extend(new)
        bar.update(len(new))

    try:
        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(compute, number, batch) for number, batch in todo]
                try:
                    for future in as_completed(futures):
                        keep(future.result())  # appended here, by this thread alone
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        else:
            for number, batch in todo:
                keep(compute(number, batch))
    except BaseException:
        bar.close()  # its line ends here: an error printed next starts a line of its own
        raise
    if where.world > 1:
        for part in gather(made):
            done.update((r["id"], r) for r in part)
        bar.update(len(ids) - bar.n)
    bar.close()
    return [done[key] for key in ids]
