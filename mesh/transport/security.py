"""The mesh secret, member identities, the CURVE keys, and the ZAP handler that admits members.

One master secret (32 random bytes, ``mesh secret FILE``) makes a mesh. Its holder derives from
it three CURVE keypairs (protocol.md, "Security"): the stages' server key, the client key
coordinators connect with, and the client key a stage uses towards the next stage; and the
coordinators' salt key (tenant cache salts, and the keeper tag of prefix records). A stage's ZAP
handler admits exactly the two client keys and tags the connection with their role, so a peer
without them never completes a handshake, gets no reply and touches no state, and a member's
role (coordinator or stage) is known for every frame it sends.

Members need not hold the master: ``mesh secret MASTER --member stage OUT`` writes a stage
identity (the server and stage keypairs, the coordinator's public key: nothing from which a
coordinator's secret can be derived), ``--member coordinator OUT`` a coordinator identity (its
keypair, the public keys, the salt key). ``load_keys`` reads either, or the master, and refuses
an identity of the wrong role.

    keys = load_keys(path, ROLE_STAGE)               # a master secret or a stage identity
    guard = ZapGuard(zmq.Context.instance(), keys)   # before the stage binds
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth.thread
from zmq.utils import z85

from mesh.errors import SecretError
from mesh.transport.wire import KEEPER_BYTES

SECRET_BYTES = 32
SALT_BYTES = 16  # a tenant's cache salt
ROLE_COORDINATOR = "coordinator"
ROLE_STAGE = "stage"
ROLE_MASTER = "master"  # the master secret: every role
MEMBER_ROLES = (ROLE_STAGE, ROLE_COORDINATOR)
_LABEL = b"mesh-curve-v1|"
_SALT_LABEL = b"mesh-salt-key-v1|"
_KEEPER_LABEL = b"mesh-records-keeper-v1"
_TENANT_LABEL = b"mesh-tenant-v1|"
_MEMBER_HEADER = "mesh-member-v1"
# What each identity file holds: (line name, what it is).
_MEMBER_FIELDS = {
    ROLE_STAGE: ("server-secret", "stage-secret", "coordinator-public"),
    ROLE_COORDINATOR: ("coordinator-secret", "server-public", "stage-public", "salt-key"),
}


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes | None  # Z85, 40 bytes; None: this member knows only the public half


@dataclass(frozen=True)
class MeshKeys:
    server: KeyPair  # every stage's listening socket
    coordinator: KeyPair  # coordinators' connections to stages
    stage: KeyPair  # a stage's connection to the next stage
    salt_key: bytes | None = None  # coordinators': tenant salts and the records keeper
    role: str = ROLE_MASTER  # what the keys were loaded from: master, stage or coordinator

    def role_of(self, client_public: bytes) -> str | None:
        return {self.coordinator.public: ROLE_COORDINATOR,
                self.stage.public: ROLE_STAGE}.get(client_public)

    @property
    def can_stage(self) -> bool:
        """Holds what a stage needs: the server and stage secret keys."""
        return self.server.secret is not None and self.stage.secret is not None

    @property
    def can_coordinate(self) -> bool:
        return self.coordinator.secret is not None and self.salt_key is not None

    @property
    def keeper(self) -> bytes | None:
        """The tag a coordinator's Stops bind its prefix records to, presented again in its
        Handshake to be told what they hold (protocol.md, "Security")."""
        if self.salt_key is None:
            return None
        return hmac.new(self.salt_key, _KEEPER_LABEL, hashlib.sha256).digest()[:KEEPER_BYTES]

    def require(self, role: str, what: str = "") -> MeshKeys:
        """These keys, if they can act as ``role``; else a one-line SecretError."""
        able = self.can_stage if role == ROLE_STAGE else self.can_coordinate
        if not able:
            raise SecretError(f"{what or 'these keys'}: a {self.role} identity cannot act as a "
                              f"{role} (give the mesh secret, or a {role} identity from "
                              f"`mesh secret MASTER --member {role} FILE`)")
        return self


def _pair(secret: bytes, role: bytes) -> KeyPair:
    """Curve25519 keypair for ``role``: secret key SHA-256(label | role | secret)."""
    secret_key = z85.encode(hashlib.sha256(_LABEL + role + b"|" + secret).digest())
    return KeyPair(public=zmq.curve_public(secret_key), secret=secret_key)


def derive_keys(secret: bytes) -> MeshKeys:
    """Every key of the mesh, from its master secret."""
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"a mesh secret is {SECRET_BYTES} bytes")
    return MeshKeys(server=_pair(secret, b"server"), coordinator=_pair(secret, b"coordinator"),
                    stage=_pair(secret, b"stage"),
                    salt_key=hashlib.sha256(_SALT_LABEL + secret).digest())


def member_keys(keys: MeshKeys, role: str) -> MeshKeys:
    """What a member of ``role`` holds: for a stage, no coordinator secret and no salt key; for
    a coordinator, no server or stage secret."""
    if role == ROLE_STAGE:
        return MeshKeys(server=keys.server, stage=keys.stage,
                        coordinator=KeyPair(keys.coordinator.public, None), role=ROLE_STAGE)
    if role == ROLE_COORDINATOR:
        return MeshKeys(server=KeyPair(keys.server.public, None),
                        stage=KeyPair(keys.stage.public, None), coordinator=keys.coordinator,
                        salt_key=keys.salt_key, role=ROLE_COORDINATOR)
    raise SecretError(f"a member is a {' or a '.join(MEMBER_ROLES)}, not {role!r}")


_PROCESS_SALT_KEY = os.urandom(SECRET_BYTES)


def salt_key_of(keys: MeshKeys | None) -> bytes:
    """The coordinator's salt key: its identity's, or (no mesh secret) this process's own."""
    if keys is not None and keys.salt_key is not None:
        return keys.salt_key
    return _PROCESS_SALT_KEY


def tenant_salt(salt_key: bytes, api_key: bytes) -> bytes:
    """A tenant's cache salt (``prefix_id``): an HMAC of its API key under the coordinators'
    salt key, which stages never see, so a salt does not reveal or test a key."""
    return hmac.new(salt_key, _TENANT_LABEL + api_key, hashlib.sha256).digest()[:SALT_BYTES]


def _create_private(path: Path, text: str, what: str) -> None:
    """Write ``text`` to a new file readable by its owner only; never overwrites a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(f"{path} exists; {what} is never overwritten") from None
    except OSError as exc:
        raise SecretError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)


def write_secret(path: Path) -> None:
    """A new random master secret, hex, readable by its owner only; never overwrites a file."""
    _create_private(path, os.urandom(SECRET_BYTES).hex() + "\n", "a mesh secret")


def write_member(master: Path, role: str, path: Path) -> None:
    """A member identity of ``role`` derived from the master secret at ``master``."""
    keys = member_keys(derive_keys(load_secret(master)), role)
    values = {"server-secret": keys.server.secret, "stage-secret": keys.stage.secret,
              "coordinator-secret": keys.coordinator.secret,
              "server-public": keys.server.public, "stage-public": keys.stage.public,
              "coordinator-public": keys.coordinator.public,
              "salt-key": keys.salt_key.hex().encode() if keys.salt_key else None}
    lines = [f"{_MEMBER_HEADER} {role}"]
    for name in _MEMBER_FIELDS[role]:
        value = values[name]
        if value is None:
            raise SecretError(f"the master secret gives no {name} for a {role}")
        lines.append(f"{name} {value.decode()}")
    _create_private(path, "\n".join(lines) + "\n", "a member identity")


def _read_private(path: Path, what: str) -> str:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as exc:
        raise SecretError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{path} is readable by others; chmod 600 it")
    return text


def _parse_secret(text: str) -> bytes | None:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        return None
    return secret if len(secret) == SECRET_BYTES else None


def load_secret(path: Path) -> bytes:
    """The master secret at ``path`` (not a member identity: see ``load_keys``)."""
    secret = _parse_secret(_read_private(path, "mesh secret"))
    if secret is None:
        raise SecretError(f"{path} does not hold a mesh secret ({2 * SECRET_BYTES} hex digits; "
                          "make one with `mesh secret FILE`)")
    return secret


def _parse_member(path: Path, text: str) -> MeshKeys:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    header = lines[0] if lines else []
    if len(header) != 2 or header[0] != _MEMBER_HEADER or header[1] not in MEMBER_ROLES:
        raise SecretError(f"{path} holds neither a mesh secret ({2 * SECRET_BYTES} hex digits, "
                          "`mesh secret FILE`) nor a member identity (`mesh secret MASTER "
                          "--member stage|coordinator FILE`)")
    role = header[1]
    fields = {line[0]: line[1] for line in lines[1:] if len(line) == 2}
    if set(fields) != set(_MEMBER_FIELDS[role]) or len(lines) != len(fields) + 1:
        raise SecretError(f"{path}: a {role} identity holds exactly "
                          f"{', '.join(_MEMBER_FIELDS[role])}")

    def key(name: str) -> bytes:
        value = fields[name].encode()
        try:
            if len(value) != 40 or len(z85.decode(value)) != 32:
                raise ValueError
        except (ValueError, KeyError, IndexError):  # z85.decode raises KeyError on bad chars
            raise SecretError(f"{path}: {name} is not a Z85 CURVE key") from None
        return value

    def pair(name: str) -> KeyPair:
        if f"{name}-secret" in fields:
            secret = key(f"{name}-secret")
            return KeyPair(zmq.curve_public(secret), secret)
        return KeyPair(key(f"{name}-public"), None)

    salt_key = None
    if "salt-key" in fields:
        salt_key = _parse_secret(fields["salt-key"])
        if salt_key is None:
            raise SecretError(f"{path}: salt-key is not {2 * SECRET_BYTES} hex digits")
    return MeshKeys(server=pair("server"), coordinator=pair("coordinator"), stage=pair("stage"),
                    salt_key=salt_key, role=role)


def load_keys(path: Path, role: str | None = None) -> MeshKeys:
    """The keys in ``path``: a master secret (every role) or a member identity; with ``role``,
    an identity that cannot act as it is refused with one line saying so."""
    text = _read_private(path, "mesh secret")
    secret = _parse_secret(text)
    keys = derive_keys(secret) if secret is not None else _parse_member(path, text)
    return keys.require(role, str(path)) if role is not None else keys


def curve_server(sock: zmq.Socket, keys: MeshKeys) -> None:
    if keys.server.secret is None:
        raise SecretError("a coordinator identity cannot listen as a stage")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server.public)


def curve_client(sock: zmq.Socket, keys: MeshKeys, pair: KeyPair) -> None:
    if pair.secret is None:
        raise SecretError(f"a {keys.role} identity holds no secret key for this connection")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server.public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)


def join_server(sock: zmq.Socket, keys: MeshKeys) -> None:
    """A coordinator's join socket (mesh.coordinator.membership) listens with its own key
    pair: a coordinator identity holds no stage server secret."""
    if keys.coordinator.secret is None:
        raise SecretError("a stage identity cannot take joins")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.coordinator.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.coordinator.public)


def join_client(sock: zmq.Socket, keys: MeshKeys) -> None:
    """A joining stage reaches the coordinator's join socket with its stage key pair."""
    if keys.stage.secret is None:
        raise SecretError(f"a {keys.role} identity holds no stage key to join with")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.coordinator.public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.stage.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.stage.secret)


class _Members:
    def __init__(self, keys: MeshKeys, roles: tuple[str, ...]):
        self._keys = keys
        self._roles = roles

    def callback(self, _domain: str, key: bytes) -> bool:
        return self._keys.role_of(key) in self._roles


class ZapGuard(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ZAP authenticator, admitting the mesh's client keys of ``roles`` and naming
    their role as the connection's User-Id (what ``frame.get("User-Id")`` returns for its
    messages)."""

    def __init__(self, context: zmq.Context, keys: MeshKeys,
                 roles: tuple[str, ...] = MEMBER_ROLES):
        super().__init__(context)
        self._keys = keys
        self.start()
        self.configure_curve_callback("*", credentials_provider=_Members(keys, roles))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._keys.role_of(z85.encode(client_public_key)) or ""
