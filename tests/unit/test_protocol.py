"""The sans-IO protocol, without sockets: round trips, arbitrary splits, hostile input."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstore.errors import AuthenticationFailed, LocalProtocolError, RemoteProtocolError
from dstore.protocol import (
    CLOSED,
    NEED_DATA,
    Auth,
    Body,
    BodyEnd,
    ChunkData,
    ChunkList,
    Connection,
    CorruptList,
    DeleteChunk,
    Deleted,
    Done,
    Error,
    GetChunk,
    Hello,
    ListChunks,
    Message,
    Phase,
    Ping,
    Pong,
    PutChunk,
    Role,
    Stat,
    StatReply,
    Stored,
    TakeCorrupt,
)
from dstore.protocol.codec import encode_frame
from dstore.protocol.messages import MESSAGE_TYPES, to_header

SECRET = b"cluster-secret"


def _drain(conn: Connection) -> list[object]:
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return events
        events.append(event)


def handshaken_pair(
    secret_client: bytes = SECRET, secret_node: bytes = SECRET
) -> tuple[Connection, Connection]:
    """A client and a node connection taken through the handshake in memory."""
    client = Connection(Role.CLIENT, secret_client)
    node = Connection(Role.NODE, secret_node, node_id="n-test")
    node.receive_data(client.start_handshake())
    (hello,) = _drain(node)
    assert isinstance(hello, Hello)
    client.receive_data(node.answer_hello(hello))
    _drain(client)
    node.receive_data(client.answer_challenge())
    (auth,) = _drain(node)
    assert isinstance(auth, Auth)
    client.receive_data(node.welcome())
    _drain(client)
    assert client.ready and node.ready
    return client, node


def _normalise(events: list[object]) -> list[object]:
    """Merge adjacent body pieces so that differently split streams compare equal."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Body):
            if out and isinstance(out[-1], bytearray):
                out[-1] += event.data
            else:
                out.append(bytearray(event.data))
        else:
            out.append(event)
    return [bytes(e) if isinstance(e, bytearray) else e for e in out]


REQUESTS: list[tuple[Message, bytes]] = [
    (PutChunk(rid=1, trace="req-1", chunk_id="ab" * 16, length=5, checksum=b"\x01" * 16), b"hello"),
    (PutChunk(rid=2, chunk_id="cd" * 16, length=0, checksum=b"\x02" * 16), b""),
    (GetChunk(rid=3, chunk_id="ef" * 16, offset=3, length=None), b""),
    (GetChunk(rid=4, chunk_id="ef" * 16, offset=0, length=10), b""),
    (DeleteChunk(rid=5, chunk_id="01" * 16), b""),
    (Stat(rid=6), b""),
    (ListChunks(rid=7, after="00", limit=10), b""),
    (Ping(rid=8, trace="t"), b""),
    (TakeCorrupt(rid=9), b""),
]
REPLIES: list[tuple[Message, bytes]] = [
    (Stored(rid=1, created=False), b""),
    (ChunkData(rid=2, length=4, size=9, checksum=b"\x03" * 16), b"data"),
    (Done(rid=2), b""),
    (Deleted(rid=3, existed=True), b""),
    (StatReply(rid=4, node_id="n", capacity=10, used=3, reserved=1, chunks=2), b""),
    (ChunkList(rid=5, chunks=[["ab" * 16, 3, 1.5]], next="ab" * 16), b""),
    (Pong(rid=6, time=12.5), b""),
    (CorruptList(rid=8, chunks=["ab" * 16]), b""),
    (
        StatReply(
            rid=9,
            node_id="n",
            zone="z",
            scrub_bytes=5,
            scrub_passes=1,
            scrub_last_pass=3.5,
            corrupt_found=2,
            corrupt_pending=1,
        ),
        b"",
    ),
    (Error(rid=7, code="chunk_not_found", message="no such chunk"), b""),
]


def _wire(sender: Connection, items: list[tuple[Message, bytes]]) -> bytes:
    out = bytearray()
    for message, body in items:
        out += sender.send(message)
        if body:
            out += sender.send_body(body)
    return bytes(out)


def _expected(items: list[tuple[Message, bytes]]) -> list[object]:
    out: list[object] = []
    for message, body in items:
        out.append(message)
        if message.BODY_FIELD is not None:
            if body:
                out.append(body)
            out.append(BodyEnd())
    return out


@pytest.mark.parametrize("direction", ["requests", "replies"])
def test_every_message_round_trips(direction: str) -> None:
    client, node = handshaken_pair()
    sender, receiver, items = (
        (client, node, REQUESTS) if direction == "requests" else (node, client, REPLIES)
    )
    receiver.receive_data(_wire(sender, items))
    assert _normalise(_drain(receiver)) == _expected(items)


def test_every_message_type_is_covered() -> None:
    covered = {m.OP for m, _ in REQUESTS + REPLIES} | {"hello", "challenge", "auth", "welcome"}
    assert covered == set(MESSAGE_TYPES)


def _feed_in_pieces(data: bytes, cuts: list[int]) -> list[object]:
    _, node = handshaken_pair()
    events: list[object] = []
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        node.receive_data(data[last:cut])
        last = cut
        events += _drain(node)
    node.receive_data(b"")
    assert node.next_event() is CLOSED
    return _normalise(events)


def test_same_events_whole_byte_by_byte_and_random_splits() -> None:
    client, _ = handshaken_pair()
    data = _wire(client, REQUESTS)
    whole = _feed_in_pieces(data, [])
    assert whole == _expected(REQUESTS)
    assert _feed_in_pieces(data, list(range(1, len(data)))) == whole
    rng = random.Random(1234)
    for _ in range(50):
        cuts = rng.sample(range(1, len(data)), rng.randint(1, min(20, len(data) - 1)))
        assert _feed_in_pieces(data, cuts) == whole


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_arbitrary_splits_give_identical_events(data: st.DataObject) -> None:
    client, _ = handshaken_pair()
    body = data.draw(st.binary(max_size=3000))
    items = [
        (PutChunk(rid=1, chunk_id="aa" * 16, length=len(body), checksum=b"\0" * 16), body),
        (Ping(rid=2), b""),
    ]
    wire = _wire(client, items)
    cuts = data.draw(
        st.lists(
            st.integers(min_value=1, max_value=max(1, len(wire) - 1)), max_size=30, unique=True
        )
    )
    assert _feed_in_pieces(wire, [c for c in cuts if c < len(wire)]) == _expected(items)


def _ready_node() -> Connection:
    return handshaken_pair()[1]


def test_oversize_frame_length_is_refused_before_buffering() -> None:
    node = _ready_node()
    node.receive_data(struct.pack(">I", node.max_frame + 1))
    with pytest.raises(RemoteProtocolError, match="frame length"):
        node.next_event()
    with pytest.raises(RemoteProtocolError):
        node.next_event()  # a broken connection stays broken


def test_zero_length_frame_is_refused() -> None:
    node = _ready_node()
    node.receive_data(b"\0\0\0\0")
    with pytest.raises(RemoteProtocolError):
        node.next_event()


def test_oversize_body_is_refused() -> None:
    node = Connection(Role.NODE, SECRET, max_body=100)
    client = Connection(Role.CLIENT, SECRET)
    # drive the handshake by hand so the node has the small body limit
    node.receive_data(client.start_handshake())
    hello = node.next_event()
    assert isinstance(hello, Hello)
    client.receive_data(node.answer_hello(hello))
    _drain(client)
    node.receive_data(client.answer_challenge())
    _drain(node)
    client.receive_data(node.welcome())
    _drain(client)
    node.receive_data(client.send(PutChunk(rid=1, chunk_id="ab" * 16, length=101, checksum=b"")))
    with pytest.raises(RemoteProtocolError, match="body length"):
        node.next_event()


@pytest.mark.parametrize("cut", [1, 3, 4, 7])
def test_truncated_frame_at_eof_is_an_error(cut: int) -> None:
    client, node = handshaken_pair()
    wire = client.send(Ping(rid=1))
    node.receive_data(wire[:cut])
    node.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle"):
        node.next_event()


def test_truncated_body_at_eof_is_an_error() -> None:
    client, node = handshaken_pair()
    node.receive_data(client.send(PutChunk(rid=1, chunk_id="ab" * 16, length=10, checksum=b"")))
    node.receive_data(b"12345")
    node.receive_data(b"")
    events = []
    with pytest.raises(RemoteProtocolError):
        while True:
            events.append(node.next_event())
    assert isinstance(events[0], PutChunk)


@pytest.mark.parametrize(
    "header",
    [
        {"op": "put", "rid": "one"},
        {"op": "put", "length": -5, "chunk_id": "ab" * 16},
        {"op": "put", "length": True},
        {"op": "get", "offset": 1.5},
        {"op": "list", "limit": None},
        {"op": "nonsense"},
        {"no_op": 1},
        {"op": 7},
        [1, 2, 3],
        "string",
    ],
)
def test_wrong_types_are_protocol_errors(header: object) -> None:
    node = _ready_node()
    node.receive_data(encode_frame(header))  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        node.next_event()


def test_undecodable_msgpack_is_a_protocol_error() -> None:
    node = _ready_node()
    payload = b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    node.receive_data(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(RemoteProtocolError):
        node.next_event()


def test_trailing_bytes_inside_a_frame_are_a_protocol_error() -> None:
    node = _ready_node()
    payload = msgpack.packb(to_header(Ping(rid=1))) + b"\x00"
    node.receive_data(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(RemoteProtocolError):
        node.next_event()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_garbage_only_ever_raises_the_protocol_error(garbage: bytes) -> None:
    for node in (Connection(Role.NODE, SECRET), _ready_node()):
        node.receive_data(garbage)
        node.receive_data(b"")
        try:
            for _ in range(len(garbage) + 2):
                if node.next_event() is CLOSED:
                    break
        except RemoteProtocolError:
            pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "op",
                "rid",
                "chunk_id",
                "length",
                "checksum",
                "offset",
                "trace",
                "limit",
                "after",
                "x",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=40),
            st.binary(max_size=40),
            st.sampled_from(list(MESSAGE_TYPES)),
        ),
        max_size=6,
    )
)
def test_random_headers_decode_or_raise_the_protocol_error(header: dict[str, object]) -> None:
    node = _ready_node()
    node.receive_data(encode_frame(header))
    try:
        _drain(node)
    except RemoteProtocolError:
        pass


# --- handshake and ordering -------------------------------------------------------------


def test_requests_before_the_handshake_are_refused() -> None:
    node = Connection(Role.NODE, SECRET)
    node.receive_data(encode_frame(to_header(Ping(rid=1))))
    with pytest.raises(AuthenticationFailed):
        node.next_event()


def test_requests_after_hello_but_before_auth_are_refused() -> None:
    client = Connection(Role.CLIENT, SECRET)
    node = Connection(Role.NODE, SECRET)
    node.receive_data(client.start_handshake())
    hello = node.next_event()
    assert isinstance(hello, Hello)
    node.answer_hello(hello)
    node.receive_data(encode_frame(to_header(Stat(rid=1))))
    with pytest.raises(AuthenticationFailed):
        node.next_event()


def test_wrong_secret_fails_on_both_sides() -> None:
    client = Connection(Role.CLIENT, b"wrong")
    node = Connection(Role.NODE, SECRET)
    node.receive_data(client.start_handshake())
    hello = node.next_event()
    assert isinstance(hello, Hello)
    challenge = node.answer_hello(hello)
    client.receive_data(challenge)
    with pytest.raises(AuthenticationFailed, match="node failed"):
        client.next_event()
    # a client that ignores the node's proof still cannot prove itself
    node.receive_data(encode_frame(to_header(Auth(proof=b"\0" * 32))))
    with pytest.raises(AuthenticationFailed, match="client failed"):
        node.next_event()


def test_auth_proof_replayed_on_another_connection_fails() -> None:
    client = Connection(Role.CLIENT, SECRET)
    node1 = Connection(Role.NODE, SECRET)
    hello_bytes = client.start_handshake()
    node1.receive_data(hello_bytes)
    hello = node1.next_event()
    assert isinstance(hello, Hello)
    client.receive_data(node1.answer_hello(hello))
    _drain(client)
    auth_bytes = client.answer_challenge()  # valid for node1's nonce only
    node2 = Connection(Role.NODE, SECRET)
    node2.receive_data(hello_bytes)  # an eavesdropper replays the whole client side
    hello2 = node2.next_event()
    assert isinstance(hello2, Hello)
    node2.answer_hello(hello2)
    node2.receive_data(auth_bytes)
    with pytest.raises(AuthenticationFailed):
        node2.next_event()
    node1.receive_data(auth_bytes)
    assert isinstance(node1.next_event(), Auth)


def test_no_common_version_is_answered_with_an_error() -> None:
    node = Connection(Role.NODE, SECRET)
    node.receive_data(encode_frame(to_header(Hello(versions=[99], nonce=b"\1" * 32))))
    hello = node.next_event()
    assert isinstance(hello, Hello)
    reply = node.answer_hello(hello)
    client = Connection(Role.CLIENT, SECRET)
    client.start_handshake()
    client.receive_data(reply)
    error = client.next_event()
    assert isinstance(error, Error) and error.code == "unsupported_version"
    assert node.phase is Phase.BROKEN


def test_sending_rules_are_enforced_locally() -> None:
    client, node = handshaken_pair()
    with pytest.raises(LocalProtocolError):
        client.send(Stored(rid=1))  # a client does not send replies
    with pytest.raises(LocalProtocolError):
        node.send(Ping(rid=1))  # a node does not send requests
    client.send(PutChunk(rid=1, chunk_id="ab" * 16, length=4, checksum=b""))
    with pytest.raises(LocalProtocolError, match="owed"):
        client.send(Ping(rid=2))
    with pytest.raises(LocalProtocolError):
        client.send_body(b"12345")
    client.send_body(b"1234")
    client.send(Ping(rid=2))
    fresh = Connection(Role.CLIENT, SECRET)
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        fresh.send(Ping(rid=1))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    node = _ready_node()
    header = to_header(Ping(rid=9)) | {"future_field": [1, 2]}
    node.receive_data(encode_frame(header))
    assert node.next_event() == Ping(rid=9)


def test_body_pieces_are_views_not_copies() -> None:
    client, node = handshaken_pair()
    node.receive_data(client.send(PutChunk(rid=1, chunk_id="ab" * 16, length=8, checksum=b"")))
    piece = b"abcdefgh"
    _drain(node)
    node.receive_data(piece)
    event = node.next_event()
    assert isinstance(event, Body) and event.data.obj is piece


def test_an_error_frame_in_place_of_auth_does_not_open_the_node() -> None:
    """Under ``python -O`` this once got a welcome: the node took an error frame where
    the auth belongs, and ``welcome`` checked only the phase."""
    node = Connection(Role.NODE, SECRET)
    node.receive_data(encode_frame(to_header(Hello(nonce=b"\1" * 32))))
    hello = node.next_event()
    assert isinstance(hello, Hello)
    node.answer_hello(hello)
    node.receive_data(encode_frame(to_header(Error(code="x", message="let me in"))))
    with pytest.raises(AuthenticationFailed):
        node.next_event()
    assert node.phase is Phase.BROKEN
    with pytest.raises(LocalProtocolError):
        node.welcome()


def test_only_a_verified_auth_lets_the_node_welcome() -> None:
    node = Connection(Role.NODE, SECRET)
    with pytest.raises(LocalProtocolError):
        node.welcome()  # nothing received
    node.receive_data(encode_frame(to_header(Hello(nonce=b"\1" * 32))))
    hello = node.next_event()
    assert isinstance(hello, Hello)
    with pytest.raises(LocalProtocolError):
        node.welcome()  # a hello only
    node.answer_hello(hello)
    with pytest.raises(LocalProtocolError):
        node.welcome()  # a challenge sent, no auth yet
    assert node.phase is Phase.AWAIT_AUTH


@pytest.mark.parametrize("role", list(Role))
def test_every_phase_refuses_what_its_table_does_not_list(role: Role) -> None:
    """Feed each kind of message to a connection in each phase it can reach: it is taken
    exactly when the table lists the move (or it is an error frame a phase takes)."""
    from dstore.protocol.connection import _ERRORS_TAKEN, _MOVES, _Way

    samples: list[Message] = [
        Hello(nonce=b"\1" * 32),
        Auth(proof=b"\0" * 32),
        Ping(rid=1),
        Pong(rid=1),
        Error(code="x", message="y"),
    ]
    for phase in Phase:
        for message in samples:
            conn = Connection(role, SECRET)
            conn._enter(phase)  # the one reach inside: to start from any phase
            conn.receive_data(encode_frame(to_header(message)))
            listed = any(
                (role, phase, _Way.RECEIVE, cls) in _MOVES for cls in type(message).__mro__
            )
            if isinstance(message, Error):
                listed = phase in _ERRORS_TAKEN[role]
            if phase is Phase.BROKEN:
                listed = False
            try:
                conn.next_event()
            except (RemoteProtocolError, AuthenticationFailed):
                taken = False
            else:
                taken = True
            # an auth's proof is checked too: a listed auth with a wrong proof is refused
            if isinstance(message, Auth) and listed:
                assert not taken
                continue
            assert taken is listed, (role, phase, message.OP)


def test_frames_before_the_handshake_are_capped_at_a_few_kib() -> None:
    node = Connection(Role.NODE, SECRET)
    node.receive_data(struct.pack(">I", 5000))
    with pytest.raises(RemoteProtocolError, match="frame length 5000"):
        node.next_event()
    _, ready = handshaken_pair()
    ready.receive_data(encode_frame(to_header(Ping(rid=1, trace="x" * 5000))))
    assert isinstance(ready.next_event(), Ping)  # once ready, the full limit
