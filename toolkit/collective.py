"""How the ranks decide together (design invariant 5): one rank's verdict, or one number, reaches all.

Every decision that could make one rank leave a collective that another has entered (a refused resume,
a full disk, a stop signal) goes through these: the main process decides and broadcasts, or every rank
says yes or no and all learn the answer. The one-number agreements run on a gloo group on the CPU, so
that they never wait for the GPU's queue.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ranks:
    """This process's rank and the world size, and the agreements between the ranks."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._flag_group = None

    def from_main(self, value):
        """The main process's ``value`` on every rank (a broadcast when there are several)."""
        if self.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def all_ok(self, ok: bool, group=None) -> bool:
        """True on every rank only if every rank says ``ok``: how a write that failed on one rank (a full disk)
        reaches the others, so that all stop together instead of waiting for it."""
        return bool(self._reduce(int(ok), dist.ReduceOp.MIN, group))

    def gather(self, value, group=None) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank (on ``group``, by default the
        gloo group of ``flag_group``)."""
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value, group=group or self.flag_group())
        return out

    def largest(self, value: int) -> int:
        """The largest ``value`` over the ranks (a stop signal's number, 0 for none)."""
        return self._reduce(value, dist.ReduceOp.MAX)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (on the default group: NCCL on GPUs)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _reduce(self, value: int, op, group=None) -> int:
        flag = torch.tensor([value])
        if self.world_size > 1:
            dist.all_reduce(flag, op=op, group=group or self.flag_group())
        return int(flag.item())

    def flag_group(self):
        """The process group for one-number agreements: gloo, on the CPU, so that they never wait for the GPU."""
        if self._flag_group is None:
            gloo = dist.get_backend() == "gloo"
            self._flag_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        return self._flag_group

    def say(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)
