"""The mesh secret, the CURVE keys derived from it, and the ZAP handler that admits members.

One secret (32 random bytes, ``mesh secret FILE``) makes a mesh. Every member derives from it
the same three CURVE keypairs (protocol.md, "Security"): the stages' server key, the client key
coordinators connect with, and the client key a stage uses towards the next stage. A stage's
ZAP handler admits exactly those two client keys and tags the connection with their role, so a
peer without the secret never completes a handshake, gets no reply and touches no state, and a
member's role (coordinator or stage) is known for every frame it sends.

    secret = load_secret(path)
    keys = derive_keys(secret)
    guard = ZapGuard(zmq.Context.instance(), keys)   # before the stage binds
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth.thread
from zmq.utils import z85

from mesh.errors import MeshError

SECRET_BYTES = 32
ROLE_COORDINATOR = "coordinator"
ROLE_STAGE = "stage"
_LABEL = b"mesh-curve-v1|"


class SecretError(MeshError):
    code = "bad_secret"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes


@dataclass(frozen=True)
class MeshKeys:
    server: KeyPair  # every stage's listening socket
    coordinator: KeyPair  # coordinators' connections to stages
    stage: KeyPair  # a stage's connection to the next stage

    def role_of(self, client_public: bytes) -> str | None:
        return {self.coordinator.public: ROLE_COORDINATOR,
                self.stage.public: ROLE_STAGE}.get(client_public)


def _pair(secret: bytes, role: bytes) -> KeyPair:
    """Curve25519 keypair for ``role``: secret key SHA-256(label | role | secret)."""
    secret_key = z85.encode(hashlib.sha256(_LABEL + role + b"|" + secret).digest())
    return KeyPair(public=zmq.curve_public(secret_key), secret=secret_key)


def derive_keys(secret: bytes) -> MeshKeys:
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"a mesh secret is {SECRET_BYTES} bytes")
    return MeshKeys(server=_pair(secret, b"server"), coordinator=_pair(secret, b"coordinator"),
                    stage=_pair(secret, b"stage"))


def write_secret(path: Path) -> None:
    """A new random secret, hex, readable by its owner only; never overwrites a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(f"{path} exists; a mesh secret is never overwritten") from None
    with os.fdopen(fd, "w") as out:
        out.write(os.urandom(SECRET_BYTES).hex() + "\n")


def load_secret(path: Path) -> bytes:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise SecretError(f"cannot read the mesh secret {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{path} is readable by others; chmod 600 it")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"{path} does not hold a mesh secret ({2 * SECRET_BYTES} hex digits; "
                          "make one with `mesh secret FILE`)")
    return secret


def curve_server(sock: zmq.Socket, keys: MeshKeys) -> None:
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server.public)


def curve_client(sock: zmq.Socket, keys: MeshKeys, pair: KeyPair) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server.public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)


class _Members:
    def __init__(self, keys: MeshKeys):
        self._keys = keys

    def callback(self, _domain: str, key: bytes) -> bool:
        return self._keys.role_of(key) is not None


class ZapGuard(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ZAP authenticator, admitting the mesh's two client keys and naming their role
    as the connection's User-Id (what ``frame.get("User-Id")`` returns for its messages)."""

    def __init__(self, context: zmq.Context, keys: MeshKeys):
        super().__init__(context)
        self._keys = keys
        self.start()
        self.configure_curve_callback("*", credentials_provider=_Members(keys))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._keys.role_of(z85.encode(client_public_key)) or ""
