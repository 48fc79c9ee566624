"""HMAC challenge-response over the cluster secret, in both directions.

client → node   Hello{versions, nonce_c}
node → client   Challenge{version, nonce_n,
                          proof_n = HMAC(secret, "dstore-node" | nonce_c | nonce_n)}
client → node   Auth{proof_c = HMAC(secret, "dstore-client" | nonce_n | nonce_c)}
node → client   Welcome{node_id}

Distinct labels stop a proof from one direction being replayed in the other; fresh nonces
on both sides stop replays across connections.
"""

from __future__ import annotations

import hashlib
import hmac

NODE_LABEL = b"dstore-node\x00"
CLIENT_LABEL = b"dstore-client\x00"


def proof(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def node_proof(secret: bytes, client_nonce: bytes, node_nonce: bytes) -> bytes:
    return proof(secret, NODE_LABEL, client_nonce, node_nonce)


def client_proof(secret: bytes, client_nonce: bytes, node_nonce: bytes) -> bytes:
    return proof(secret, CLIENT_LABEL, node_nonce, client_nonce)


def verify(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


JOIN_LABEL = b"dstore-join\x00"
JOIN_WINDOW = 300.0  # seconds a join request's timestamp may be off


def join_proof(secret: bytes, addr: str, timestamp: int) -> str:
    """What a storage node sends to register with a gateway's admin API: proof that it
    knows the cluster secret, bound to its address and the time."""
    return hmac.new(
        secret, JOIN_LABEL + f"{addr}\x00{timestamp}".encode(), hashlib.sha256
    ).hexdigest()


def verify_join(secret: bytes, addr: str, timestamp: int, proof: str, now: float) -> bool:
    if abs(now - timestamp) > JOIN_WINDOW:
        return False
    return hmac.compare_digest(join_proof(secret, addr, timestamp), proof)
