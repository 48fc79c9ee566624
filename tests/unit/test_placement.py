"""Placement, a pure function of the cluster view: least loaded first, distinct nodes,
distinct zones where enough have room, never past a node's capacity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstore.errors import NotEnoughNodes, OutOfSpace
from dstore.master.placement import NodeView, place


def node(node_id: str, used: int = 0, capacity: int = 100, zone: str = "z", **kw: bool) -> NodeView:
    return NodeView(node_id, zone, capacity, used, 0, **kw)


def test_the_least_loaded_nodes_are_picked_first() -> None:
    nodes = [node("a", used=50), node("b", used=10), node("c", used=30)]
    assert place(nodes, 5, 2) == ["b", "c"]


def test_load_is_a_fraction_of_capacity_and_counts_reservations() -> None:
    big = NodeView("big", "z", 1000, 200, 0)  # 20 % full
    small = NodeView("small", "z", 100, 10, 0)  # 10 % full
    busy = NodeView("busy", "z", 100, 0, 50)  # 50 % reserved
    assert place([big, small, busy], 1, 1) == ["small"]
    assert place([big, busy], 1, 1) == ["big"]


def test_replicas_go_to_distinct_zones_when_they_can() -> None:
    nodes = [node("a1", 0, zone="a"), node("a2", 1, zone="a"), node("b1", 50, zone="b")]
    assert place(nodes, 5, 2) == ["a1", "b1"]
    # one zone only: distinct nodes in it
    assert place([node("a1", zone="a"), node("a2", zone="a")], 5, 2) == ["a1", "a2"]


def test_down_draining_and_excluded_nodes_take_nothing() -> None:
    nodes = [
        node("down", up=False),
        node("draining", accepts_writes=False),
        node("tried"),
        node("ok", used=90),
    ]
    assert place(nodes, 5, 1, exclude={"tried"}) == ["ok"]
    with pytest.raises(NotEnoughNodes):
        place(nodes, 5, 2, exclude={"tried"})


def test_a_node_without_room_is_skipped_and_too_few_with_room_is_out_of_space() -> None:
    nodes = [node("full", used=98), node("roomy", used=50)]
    assert place(nodes, 5, 1) == ["roomy"]
    with pytest.raises(OutOfSpace):
        place(nodes, 5, 2)


views = st.lists(
    st.builds(
        NodeView,
        node_id=st.uuids().map(str),
        zone=st.sampled_from(["a", "b", "c"]),
        capacity=st.integers(0, 1000),
        used=st.integers(0, 1000),
        reserved=st.integers(0, 100),
        up=st.booleans(),
        accepts_writes=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda n: n.node_id,
)


@given(views, st.integers(0, 200), st.integers(1, 4))
def test_placement_never_breaks_its_rules(nodes: list[NodeView], size: int, replicas: int) -> None:
    try:
        chosen = place(nodes, size, replicas)
    except (NotEnoughNodes, OutOfSpace):
        writable = [n for n in nodes if n.up and n.accepts_writes]
        assert len(writable) < replicas or sum(n.free >= size for n in writable) < replicas
        return
    by_id = {n.node_id: n for n in nodes}
    assert len(chosen) == replicas == len(set(chosen))
    for node_id in chosen:
        picked = by_id[node_id]
        assert picked.up and picked.accepts_writes and picked.free >= size
    # the first pick is a least loaded node with room
    fits = [n for n in nodes if n.up and n.accepts_writes and n.free >= size]
    assert by_id[chosen[0]].load == min(n.load for n in fits)
    # as many zones as there were to have, up to the replicas wanted
    assert len({by_id[c].zone for c in chosen}) == min(replicas, len({n.zone for n in fits}))
