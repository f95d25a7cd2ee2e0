"""One ring step's point-to-point messages: posted together, waited together.

Every rank posts the messages of step ``t`` before it waits on any of them, and the two ends of every message post
it in the same step and in the same order, so the schedule cannot deadlock and messages between one pair of ranks
match in order (which gloo, matching by tag, and NCCL, matching by order, both need). The posting goes through
``batch_isend_irecv``, which NCCL groups into one launch and other backends run as plain ``isend``/``irecv``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ._checks import GroupInfo

__all__ = ["StepMessages"]


class StepMessages:
    """Collects ``send``/``recv`` calls for one step, then :meth:`start` posts them and :meth:`wait` completes them.

    Tensors handed to :meth:`send` must not change until :meth:`wait` returns; buffers returned by :meth:`recv`
    hold the data only after :meth:`wait`.
    """

    def __init__(self, gi: GroupInfo) -> None:
        self._gi = gi
        self._ops: List[dist.P2POp] = []
        self._works: List = []

    def send(self, tensor: torch.Tensor, to_rank: int) -> None:
        """Queue ``tensor`` (made contiguous) for group rank ``to_rank``."""
        tensor = tensor.contiguous()
        self._ops.append(dist.P2POp(dist.isend, tensor, self._gi.global_rank(to_rank), self._gi.group))

    def recv(self, like: torch.Tensor, from_rank: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Queue a receive from group rank ``from_rank`` into a new buffer shaped like ``like`` (in ``dtype``,
        default ``like.dtype``); returns the buffer."""
        buf = torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)
        self._ops.append(dist.P2POp(dist.irecv, buf, self._gi.global_rank(from_rank), self._gi.group))
        return buf

    def start(self) -> StepMessages:
        """Post every queued message (nothing to do when none were queued)."""
        if self._ops:
            self._works = dist.batch_isend_irecv(self._ops) or []
        return self

    def wait(self) -> None:
        """Block until every posted message of this step has completed."""
        for work in self._works:
            work.wait()
        self._works = []
        self._ops = []
