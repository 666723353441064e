"""The few collectives the checkpoint code needs, over a gloo group of its own: texts (bytes in
tensors, so that no pickled object travels between ranks), a barrier, and which rank has a problem."""

from __future__ import annotations

from typing import overload

import torch
import torch.distributed as dist


def position(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def first_problem(problem: str | None, group: dist.ProcessGroup | None) -> str | None:
    """The problem of the lowest rank that has one, on every rank; None if no rank has one."""
    rank, ranks = position(group)
    if ranks == 1:
        return problem
    first = torch.tensor([rank if problem is not None else ranks], dtype=torch.int64)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    if first.item() == ranks:
        return None
    return broadcast_text(problem, group, src=int(first.item()))


def barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


@overload
def broadcast_text(text: str, group: dist.ProcessGroup | None = None, src: int = 0) -> str: ...
@overload
def broadcast_text(text: str | None, group: dist.ProcessGroup | None = None, src: int = 0) -> str | None: ...
def broadcast_text(text: str | None, group: dist.ProcessGroup | None = None, src: int = 0) -> str | None:
    """Rank `src`'s text (or None) on every rank (ranks of `group`), as bytes in tensors: no
    pickled objects travel."""
    if not dist.is_initialized():
        return text
    data = (text or "").encode()
    length = torch.tensor([-1 if text is None else len(data)], dtype=torch.int64)
    dist.broadcast(length, group=group, group_src=src)
    if length.item() < 0:
        return None
    buffer = (
        torch.tensor(list(data), dtype=torch.uint8)
        if dist.get_rank(group) == src
        else torch.zeros(int(length.item()), dtype=torch.uint8)
    )
    dist.broadcast(buffer, group=group, group_src=src)
    return bytes(buffer.tolist()).decode()


def gather_texts(text: str, group: dist.ProcessGroup | None = None) -> list[str]:
    """Every rank's text, in rank order, on every rank of `group` (as bytes in tensors: no pickled
    objects travel)."""
    if not dist.is_initialized():
        return [text]
    ranks = dist.get_world_size(group)
    data = text.encode()
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=group)
    longest = max(int(length.item()) for length in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(ranks)]
    dist.all_gather(buffers, mine, group=group)
    return [buffer[: int(length.item())].numpy().tobytes().decode() for buffer, length in zip(buffers, lengths)]
