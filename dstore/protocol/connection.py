"""The sans-IO cluster protocol connection, after h11: bytes in, events out; events in,
bytes out. No sockets, no event loop, no clock: every framing, ordering and handshake rule
lives here and is tested one byte at a time.

Incoming data is fed with ``receive_data`` (``b""`` means the peer closed) and consumed
with ``next_event``, which returns a ``Message``, a ``Body`` piece, ``BodyEnd``, or one of
the sentinels ``NEED_DATA`` / ``CLOSED``. Any violation by the peer raises
``RemoteProtocolError`` and leaves the connection broken; the caller sends an ``Error``
frame if it can and closes.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dstore.errors import AuthenticationFailed, LocalProtocolError, RemoteProtocolError
from dstore.protocol import handshake
from dstore.protocol.codec import (
    DEFAULT_MAX_FRAME,
    FRAME_PREFIX,
    PREFIX_SIZE,
    decode_payload,
    encode_frame,
)
from dstore.protocol.messages import (
    MESSAGE_TYPES,
    NONCE_SIZE,
    SUPPORTED_VERSIONS,
    Auth,
    Challenge,
    Error,
    Hello,
    Message,
    Reply,
    Request,
    Welcome,
    from_header,
    to_header,
)

DEFAULT_MAX_BODY: Final = 256 << 20
# frames before the handshake is done: a hello or an auth is well under 200 bytes, so an
# unauthenticated peer can make a node hold no more than this for its frame
PRE_AUTH_MAX_FRAME: Final = 4096


class Role(enum.Enum):
    CLIENT = "client"
    NODE = "node"


class Phase(enum.Enum):
    """Where the handshake stands, seen from this side."""

    START = "start"  # client
    AWAIT_CHALLENGE = "await_challenge"  # client: Hello sent
    CHALLENGED = "challenged"  # client: the node proved the secret
    AWAIT_WELCOME = "await_welcome"  # client: Auth sent
    AWAIT_HELLO = "await_hello"  # node
    HELLO_RECEIVED = "hello_received"  # node
    AWAIT_AUTH = "await_auth"  # node: Challenge sent
    AUTHENTICATED = "authenticated"  # node: the client proved the secret
    READY = "ready"
    BROKEN = "broken"


class _Way(enum.Enum):
    SEND = "send"
    RECEIVE = "receive"


_C, _N = Role.CLIENT, Role.NODE
_OUT, _IN = _Way.SEND, _Way.RECEIVE

# Every move the handshake and the exchange after it allow: (role, phase, way, message
# class) -> the phase after. A message is matched by its class or the nearest base class
# listed (Request, Reply). Anything else is a protocol error: a node reaches READY only by
# sending Welcome, which it may only after receiving an Auth whose proof it verified.
# Error frames are the one exception, handled apart: either side may send one at any
# point; a client takes a node's error at any point after its Hello (the node refused),
# and a node takes one only once ready (before that, a peer that gives up has failed).
_MOVES: dict[tuple[Role, Phase, _Way, type[Message]], Phase] = {
    (_C, Phase.START, _OUT, Hello): Phase.AWAIT_CHALLENGE,
    (_C, Phase.AWAIT_CHALLENGE, _IN, Challenge): Phase.CHALLENGED,
    (_C, Phase.CHALLENGED, _OUT, Auth): Phase.AWAIT_WELCOME,
    (_C, Phase.AWAIT_WELCOME, _IN, Welcome): Phase.READY,
    (_C, Phase.READY, _OUT, Request): Phase.READY,
    (_C, Phase.READY, _IN, Reply): Phase.READY,
    (_N, Phase.AWAIT_HELLO, _IN, Hello): Phase.HELLO_RECEIVED,
    (_N, Phase.HELLO_RECEIVED, _OUT, Challenge): Phase.AWAIT_AUTH,
    (_N, Phase.AWAIT_AUTH, _IN, Auth): Phase.AUTHENTICATED,
    (_N, Phase.AUTHENTICATED, _OUT, Welcome): Phase.READY,
    (_N, Phase.READY, _IN, Request): Phase.READY,
    (_N, Phase.READY, _OUT, Reply): Phase.READY,
}

_ERRORS_TAKEN: dict[Role, frozenset[Phase]] = {
    Role.CLIENT: frozenset(
        {Phase.AWAIT_CHALLENGE, Phase.CHALLENGED, Phase.AWAIT_WELCOME, Phase.READY}
    ),
    Role.NODE: frozenset({Phase.READY}),
}


def _compiled(role: Role, phase: Phase, way: _Way) -> dict[type[Message], Phase]:
    """The table's moves out of one phase one way, by exact message class (each class
    matched to its nearest listed base): what a connection in that phase looks up, one
    dict lookup per message."""
    return _COMPILED[role, phase, way]


def _compile() -> dict[tuple[Role, Phase, _Way], dict[type[Message], Phase]]:
    compiled: dict[tuple[Role, Phase, _Way], dict[type[Message], Phase]] = {}
    for role in Role:
        for phase in Phase:
            for way in _Way:
                moves: dict[type[Message], Phase] = {}
                for cls in (*MESSAGE_TYPES.values(), Hello, Challenge, Auth, Welcome):
                    for base in cls.__mro__:
                        after = _MOVES.get((role, phase, way, base))
                        if after is not None:
                            moves[cls] = after
                            break
                compiled[role, phase, way] = moves
    return compiled


_COMPILED = _compile()


@dataclass(frozen=True, slots=True)
class Body:
    """A piece of a raw body; ``data`` may be a view into received bytes (no copy)."""

    data: memoryview


@dataclass(frozen=True, slots=True)
class BodyEnd:
    """The announced body has been received in full."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")

Event = Message | Body | BodyEnd | _Sentinel


class Connection:
    """One side of one cluster protocol connection."""

    def __init__(
        self,
        role: Role,
        secret: bytes,
        *,
        node_id: str = "",
        max_frame: int = DEFAULT_MAX_FRAME,
        max_body: int = DEFAULT_MAX_BODY,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self.role = role
        self.max_frame = max_frame
        self.max_body = max_body
        self.version: int | None = None
        self.peer_node_id = ""
        self._secret = secret
        self._node_id = node_id
        self._random = random_bytes
        self._phase = Phase.START
        self._receivable: dict[type[Message], Phase] = {}
        self._sendable: dict[type[Message], Phase] = {}
        self._enter(Phase.AWAIT_HELLO if role is Role.NODE else Phase.START)
        self._my_nonce = b""
        self._peer_nonce = b""
        # receive side
        self._pieces: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._body_left: int | None = None  # None: expecting a frame
        # send side
        self._send_body_left = 0

    def __repr__(self) -> str:
        return (
            f"<Connection {self.role.value} {self._phase.value}, {self._buffered} bytes"
            f" buffered, body_left={self._body_left}>"
        )

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def ready(self) -> bool:
        return self._phase is Phase.READY

    # --- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty value means the peer closed its side."""
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        self._pieces.append(memoryview(data).cast("B"))
        self._buffered += len(data)

    def next_event(self) -> Event:
        if self._phase is Phase.BROKEN:
            raise RemoteProtocolError("connection is broken")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._enter(Phase.BROKEN)
            raise

    def _next_event(self) -> Event:
        if self._body_left is not None:
            return self._next_body_event()
        if self._buffered < PREFIX_SIZE:
            return self._starved()
        (size,) = FRAME_PREFIX.unpack(self._peek(PREFIX_SIZE))
        limit = self.max_frame if self._phase is Phase.READY else PRE_AUTH_MAX_FRAME
        if size == 0 or size > limit:
            raise RemoteProtocolError(f"frame length {size} outside 1..{limit}")
        if self._buffered < PREFIX_SIZE + size:
            return self._starved()
        self._take(PREFIX_SIZE)
        message = from_header(decode_payload(self._take(size)))
        length = message.body_length()
        if length > self.max_body:
            raise RemoteProtocolError(f"body length {length} exceeds limit {self.max_body}")
        self._check_incoming(message)
        if message.BODY_FIELD is not None:
            self._body_left = length
        return message

    def _next_body_event(self) -> Event:
        assert self._body_left is not None
        if self._body_left == 0:
            self._body_left = None
            return BodyEnd()
        if not self._buffered:
            return self._starved()
        first = self._pieces[0]
        if len(first) <= self._body_left:
            self._pieces.popleft()
            piece = first
        else:
            piece = first[: self._body_left]
            self._pieces[0] = first[self._body_left :]
        self._buffered -= len(piece)
        self._body_left -= len(piece)
        return Body(piece)

    @property
    def body_pending(self) -> int:
        """Body bytes announced by the last message and not yet received."""
        return self._body_left or 0

    def body_received(self, count: int) -> None:
        """Account for ``count`` body bytes received around this object (spliced from the
        socket straight on): only with nothing buffered, so none are skipped."""
        if self._buffered or not 0 <= count <= self.body_pending:
            raise LocalProtocolError(
                f"{count} body bytes received around, {self.body_pending} pending,"
                f" {self._buffered} buffered"
            )
        if self._body_left is not None:
            self._body_left -= count

    def _starved(self) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self._buffered or self._body_left is not None:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        return CLOSED

    def _peek(self, n: int) -> bytes:
        out = bytearray()
        for piece in self._pieces:
            out += piece[: n - len(out)]
            if len(out) == n:
                break
        return bytes(out)

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = self._pieces[0]
            need = n - len(out)
            if len(piece) <= need:
                out += piece
                self._pieces.popleft()
            else:
                out += piece[:need]
                self._pieces[0] = piece[need:]
        self._buffered -= n
        return bytes(out)

    def _check_incoming(self, message: Message) -> None:
        """Take a received message through the table, verifying what the handshake's
        messages prove before their move is made."""
        phase = self._phase
        if isinstance(message, Error):
            if phase in _ERRORS_TAKEN[self.role]:
                return
            raise AuthenticationFailed(f"error frame in phase {phase.value}: {message.message}")
        after = self._receivable.get(type(message))
        if after is None:
            if self.role is Role.NODE and phase is not Phase.READY:
                raise AuthenticationFailed(f"{message.OP} before the handshake completed")
            raise RemoteProtocolError(f"unexpected {message.OP!r} in phase {phase.value}")
        if isinstance(message, Hello):
            if len(message.nonce) != NONCE_SIZE:
                raise RemoteProtocolError("hello: bad nonce")
            self._peer_nonce = message.nonce
        elif isinstance(message, Auth):
            expected = handshake.client_proof(self._secret, self._peer_nonce, self._my_nonce)
            if not handshake.verify(expected, message.proof):
                raise AuthenticationFailed("client failed to prove the cluster secret")
        elif isinstance(message, Challenge):
            if message.version not in SUPPORTED_VERSIONS or len(message.nonce) != NONCE_SIZE:
                raise RemoteProtocolError("challenge: bad version or nonce")
            expected = handshake.node_proof(self._secret, self._my_nonce, message.nonce)
            if not handshake.verify(expected, message.proof):
                raise AuthenticationFailed("node failed to prove the cluster secret")
            self._peer_nonce = message.nonce
            self.version = message.version
        elif isinstance(message, Welcome):
            self.peer_node_id = message.node_id
        if after is not phase:
            self._enter(after)

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase``, with its moves from the table at hand."""
        self._phase = phase
        self._receivable = _compiled(self.role, phase, _IN)
        self._sendable = _compiled(self.role, phase, _OUT)

    def _send_move(self, message: Message, what: str) -> None:
        """Make the move of sending ``message``, or refuse it (``LocalProtocolError``)."""
        after = self._sendable.get(type(message))
        if after is None:
            raise LocalProtocolError(f"{what}: not in phase {self._phase.value}")
        if after is not self._phase:
            self._enter(after)

    # --- handshake helpers ----------------------------------------------------------------

    def start_handshake(self) -> bytes:
        """Client: the Hello that opens the connection."""
        hello = Hello(nonce=self._random(NONCE_SIZE))
        self._send_move(hello, "start_handshake is the client's first step")
        self._my_nonce = hello.nonce
        return self._encode(hello)

    def answer_hello(self, hello: Hello) -> bytes:
        """Node: the Challenge answering a received Hello (or an Error if no version fits)."""
        if self.role is not Role.NODE or self._phase is not Phase.HELLO_RECEIVED:
            raise LocalProtocolError("answer_hello answers a received hello")
        common = set(hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            self._enter(Phase.BROKEN)
            return self._encode(Error(code="unsupported_version", message="no common version"))
        version = max(common)
        nonce = self._random(NONCE_SIZE)
        node_proof = handshake.node_proof(self._secret, self._peer_nonce, nonce)
        challenge = Challenge(version=version, nonce=nonce, proof=node_proof)
        self._send_move(challenge, "answer_hello")
        self.version, self._my_nonce = version, nonce
        return self._encode(challenge)

    def answer_challenge(self) -> bytes:
        """Client: the Auth answering the verified Challenge."""
        auth = Auth(proof=handshake.client_proof(self._secret, self._my_nonce, self._peer_nonce))
        self._send_move(auth, "no verified challenge to answer")
        return self._encode(auth)

    def welcome(self) -> bytes:
        """Node: the Welcome that completes the handshake after a verified Auth."""
        welcome = Welcome(node_id=self._node_id)
        self._send_move(welcome, "welcome comes after a verified auth")
        return self._encode(welcome)

    # --- sending --------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The bytes of a request or reply; a body-bearing message must then have exactly
        its announced length passed through ``send_body``."""
        if self._send_body_left:
            raise LocalProtocolError(f"{self._send_body_left} body bytes still owed")
        if not isinstance(message, Error):  # an error frame may go out at any point
            if self._phase is not Phase.READY:
                raise LocalProtocolError(f"cannot send {message.OP!r} before the handshake")
            self._send_move(message, f"a {self.role.value} does not send {message.OP!r}")
        length = message.body_length()
        if length > self.max_body:
            raise LocalProtocolError(f"body length {length} exceeds limit {self.max_body}")
        data = self._encode(message)
        self._send_body_left = length
        return data

    def body_sent(self, count: int) -> None:
        """Account for ``count`` body bytes sent around this object (by ``sendfile``)."""
        if not 0 <= count <= self._send_body_left:
            raise LocalProtocolError(f"{count} body bytes sent, {self._send_body_left} owed")
        self._send_body_left -= count

    def send_body(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Account for a piece of the body being sent; returns it unchanged (no copy)."""
        if len(data) > self._send_body_left:
            raise LocalProtocolError(
                f"body piece of {len(data)} bytes, only {self._send_body_left} owed"
            )
        self._send_body_left -= len(data)
        return data

    @property
    def body_owed(self) -> int:
        return self._send_body_left

    def _encode(self, message: Message) -> bytes:
        return encode_frame(to_header(message), self.max_frame)
