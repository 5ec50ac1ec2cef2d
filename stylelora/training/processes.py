"""The processes of one run under ``accelerate launch`` or ``torchrun``: which one is the main one (the only
writer), what they agree on, and which one went missing when talking to the others fails.

accelerate sets the processes up (DDP over NCCL on GPUs, gloo on CPUs); this is the little the trainer
adds on top. A single process is the same object with one member, and then nothing here talks to
``torch.distributed``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# What gloo and NCCL say when the process at the other end is gone or silent (they raise a plain
# RuntimeError as often as torch.distributed.DistError).
_LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                 "NCCL communicator was aborted", "ProcessGroupGloo", "ProcessGroupNCCL")


@dataclass
class Processes:
    """This process's ``rank`` among ``count``, its ``device``, and every member's (host, pid) by rank."""

    rank: int = 0
    count: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    members: list[tuple[str, int]] = field(default_factory=lambda: [(socket.gethostname(), os.getpid())])

    @classmethod
    def of(cls, accelerator: Any) -> Processes:
        """The processes of ``accelerator``'s run; with several, every one learns where the others run."""
        team = cls(accelerator.process_index, accelerator.num_processes, accelerator.device)
        if team.count > 1:
            team.members = team.gather(team.members[0])
        return team

    @property
    def is_main(self) -> bool:
        """The main process writes every file of the run and reports progress; the others only train."""
        return self.rank == 0

    def share(self, value: T) -> T:
        """The main process's ``value``, in every process."""
        if self.count == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, by rank, in every process."""
        if self.count == 1:
            return [value]
        values: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(values, value)
        return values

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set in any process (a stop request reaches one of them, all stop together)."""
        return self.sum([float(flag)])[0] > 0

    def sum(self, values: list[float]) -> list[float]:
        """Each of ``values`` summed over the processes (in one all-reduce)."""
        if self.count == 1:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(summed)
        return summed.tolist()

    def wait(self) -> None:
        """Wait until every process gets here."""
        if self.count > 1:
            torch.distributed.barrier()

    def seed_own_stream(self, seed: int) -> None:
        """Give each process but the main one its own stream of torch's global RNG (LoRA dropout), keyed by
        (seed, rank); the main process keeps the stream a single-process run has."""
        if self.rank > 0:
            state = np.random.SeedSequence([seed, self.rank]).generate_state(1, dtype=np.uint64)[0]
            torch.manual_seed(int(state) & ((1 << 63) - 1))

    def lost_contact(self, error: BaseException) -> bool:
        """Whether ``error`` says another process of the run is gone or stopped answering."""
        if self.count == 1 or not isinstance(error, RuntimeError):
            return False
        return isinstance(error, torch.distributed.DistError) or any(s in str(error) for s in _LOST_CONTACT)

    def missing(self) -> list[int]:
        """The ranks on this machine whose process has ended (the others cannot be checked from here)."""
        host = socket.gethostname()
        return [rank for rank, (where, pid) in enumerate(self.members)
                if rank != self.rank and where == host and not _alive(pid)]

    def lost_contact_text(self) -> str:
        """Which process went missing, as far as this one can tell."""
        gone = self.missing()
        me = f"process {self.rank} of {self.count}"
        if gone:
            names = ", ".join(f"process {r} (pid {self.members[r][1]})" for r in gone)
            return f"{names} of this run ended unexpectedly, so {me} stopped too"
        return (f"{me} lost contact with the other processes of this run: one ended (on another machine?) or "
                "did not answer within train.process_timeout seconds")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped by its launcher, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
