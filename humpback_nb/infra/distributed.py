"""One run on several processes: which share of the work is this process's, and how the shares meet again.

    accelerate launch --num_processes N -m humpback_nb.cli run --preset paper-7b --run-dir runs/paper

starts N copies of the same command (one per GPU, or N processes on a CPU with the gloo backend). Every
process runs every stage. The long loops split their batches round-robin: batch b belongs to process
b mod N, is generated with the seed it has in a one-process run, and is appended to that process's own
part file (`<output>.<hash>.rank<r>.partial`). When every process is done, each reads what the others
wrote, so all of them hold every record in input order, and the main process alone writes the stage's
files. A rerun, with any number of processes, reads all part files and redoes only the missing batches:
the result is the same records a one-process run writes. Training runs through the Trainer under DDP, or
under FSDP2 for full fine-tuning when the launch config asks for it (presets/accelerate/fsdp-8gpu.yaml;
accelerate shards on GPUs only, and keeps a CPU launch DDP).

The run folder must be visible to every process (one machine, or a shared file system on a cluster).
Without a launcher, `processes()` is simply (rank 0 of 1) and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one launch."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, number: int) -> bool:
        """True when batch (or item) `number` is this process's to do."""
        return number % self.world == self.rank


def launched() -> bool:
    """True inside a launch of several processes (accelerate launch, torchrun, srun with the env set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def processes() -> Processes:
    """Rank and number of processes; the first call in a launch sets up the process group (gloo on a CPU)."""
    if not launched():
        return Processes()
    state = _state()
    return Processes(rank=state.process_index, world=state.num_processes)


def wait_for_everyone() -> None:
    """A barrier: returns when every process has reached it (at once without a launch)."""
    if launched():
        _state().wait_for_everyone()


def gather(items: list[T]) -> list[list[T]]:
    """Every process's `items`, by rank, on every process (picklable objects)."""
    if not launched():
        return [items]
    import torch.distributed as dist

    _state()
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return parts


def shared_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[function(item) for item in items], the items dealt round-robin to the processes; every process gets
    all results in order."""
    where = processes()
    mine = [(i, function(item)) for i, item in enumerate(items) if where.owns(i)]
    results: dict[int, R] = {}
    for part in gather(mine):
        results.update(part)
    return [results[i] for i in range(len(items))]


def _state():
    import torch
    from accelerate import PartialState

    # accelerate sets up a CPU process group only when asked to use the CPU
    return PartialState(cpu=not torch.cuda.is_available())
