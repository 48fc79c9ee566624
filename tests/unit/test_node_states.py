"""The storage-node state machine as a table: every pair is listed, draining is final
until the node leaves, and an answer brings any other node back up."""

from __future__ import annotations

import pytest

from dstore.errors import IllegalTransition
from dstore.master.cluster import NODE_MOVES, NodeEvent, NodeState, next_state


def test_the_table_lists_every_state_and_event() -> None:
    assert set(NODE_MOVES) == {(s, e) for s in NodeState for e in NodeEvent}


@pytest.mark.parametrize("state", [NodeState.UP, NodeState.SUSPECT, NodeState.DOWN])
def test_heartbeats_move_a_node_that_is_not_draining(state: NodeState) -> None:
    assert next_state(state, NodeEvent.ANSWERED) is NodeState.UP
    assert next_state(state, NodeEvent.SILENT) is NodeState.DOWN
    assert next_state(state, NodeEvent.DRAIN) is NodeState.DRAINING
    # a missed beat makes an up node suspect; it never brings a down one closer to up
    missed = next_state(state, NodeEvent.MISSED)
    assert missed is (NodeState.DOWN if state is NodeState.DOWN else NodeState.SUSPECT)


@pytest.mark.parametrize("event", list(NodeEvent))
def test_a_draining_node_stays_draining(event: NodeEvent) -> None:
    assert next_state(NodeState.DRAINING, event) is NodeState.DRAINING


def test_a_pair_missing_from_the_table_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    smaller = dict(NODE_MOVES)
    del smaller[NodeState.DOWN, NodeEvent.ANSWERED]
    monkeypatch.setattr("dstore.master.cluster.NODE_MOVES", smaller)
    with pytest.raises(IllegalTransition):
        next_state(NodeState.DOWN, NodeEvent.ANSWERED)
