"""Placement: a pure function of the cluster view that picks the nodes for a chunk.

Least loaded first by (used + reserved) / capacity; replicas on distinct nodes, and on
distinct zones whenever enough zones have room; a node never gets more than its capacity.
No sockets, no clock: tested on its own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from dstore.errors import NotEnoughNodes, OutOfSpace


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement needs to know of a node."""

    node_id: str
    zone: str
    capacity: int
    used: int
    reserved: int
    up: bool = True
    accepts_writes: bool = True  # false while draining

    @property
    def free(self) -> int:
        return self.capacity - self.used - self.reserved

    @property
    def load(self) -> float:
        return (self.used + self.reserved) / self.capacity if self.capacity > 0 else 1.0


def place(
    nodes: Iterable[NodeView],
    size: int,
    replicas: int,
    *,
    exclude: Collection[str] = (),
) -> list[str]:
    """The ids of ``replicas`` nodes to hold a chunk of ``size`` bytes.

    Raises ``NotEnoughNodes`` when fewer than ``replicas`` writable nodes are up, and
    ``OutOfSpace`` when enough are up but too few have room.
    """
    writable = [n for n in nodes if n.up and n.accepts_writes and n.node_id not in exclude]
    if len(writable) < replicas:
        raise NotEnoughNodes(f"{len(writable)} writable nodes up, {replicas} replicas wanted")
    candidates = sorted((n for n in writable if n.free >= size), key=lambda n: (n.load, n.node_id))
    if len(candidates) < replicas:
        raise OutOfSpace(f"only {len(candidates)} nodes have {size} bytes free")
    chosen: list[NodeView] = []
    zones: set[str] = set()
    while len(chosen) < replicas:
        fresh_zone = next((n for n in candidates if n.zone not in zones), None)
        pick = fresh_zone or candidates[0]
        chosen.append(pick)
        zones.add(pick.zone)
        candidates.remove(pick)
    return [n.node_id for n in chosen]
