"""A raw peer of one stage for tests: a DEALER speaking frames by hand.

It learns the stage's epoch from a Ping (no side effects, unlike a Handshake, which would
rewire the stage's downstream), and stamps it on the session frames it builds.
"""

from __future__ import annotations

import dataclasses
import itertools

import msgpack
import zmq

from mesh.transport import frames as fr
from mesh.transport.messages import CLASSES, Acquire, Handshake, Message, Ping, Pong, Stop
from mesh.transport.sockets import dealer

_SERIAL = itertools.count()


def with_fields(frame: bytes, **fields) -> bytes:
    """``frame`` carrying fields no kind defines as well (the typed codec writes none)."""
    body = msgpack.unpackb(frame[fr.HEADER.size:])
    data = msgpack.packb({**body, **fields}, use_bin_type=True)
    return fr.HEADER.pack(len(data)) + data


class RawPeer:
    def __init__(self, url: str, identity: bytes | None = None, keys=None, pair=None,
                 timeout_ms: int = 10_000, learn_epoch: bool = True):
        # A fresh routing id each time: a stage's ROUTER ignores a new connection that reuses
        # the id of one it has not yet seen close.
        self.identity = identity or b"coord-raw-%d" % next(_SERIAL)
        self.sock = dealer(zmq.Context.instance(), url, identity=self.identity, keys=keys,
                           pair=pair)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, timeout_ms)  # a refused peer has no connection
        self.epoch = 0
        if learn_epoch:
            pong = self.ping()
            self.epoch = pong.epoch if pong else 0

    def ping(self, nonce: int = 4242, sessions: list[int] | None = None) -> Pong | None:
        """The stage's Pong, or None if it never answers (skipping other replies). With
        ``sessions``, the Ping lists this peer's live sessions."""
        try:
            self.sock.send(fr.encode(Ping(nonce=nonce, sessions=None if sessions is None
                                          else fr.pack_sessions(sessions))))
            while True:
                msg = fr.decode(self.sock.recv())
                if isinstance(msg, Pong) and msg.nonce == nonce:
                    return msg
        except zmq.Again:
            return None

    def handshake(self, nxt: str | None = None, next_epoch: int | None = None,
                  index: int = 0, next_tag: bytes | None = None,
                  keeper: bytes | None = None) -> Message:
        self.send(fr.encode(Handshake(origin=self.identity, next=nxt, next_epoch=next_epoch,
                                      next_tag=next_tag, model_sha256=None, index=index,
                                      keeper=keeper)))
        return self.recv()

    def work(self, kind: str, session: int, pos: int, tokens=None, embd: bytes | None = None,
             n: int | None = None, origin: bytes | None = None, **extra) -> bytes:
        n = n if n is not None else len(tokens)
        if kind == fr.DECODE:
            extra.setdefault("draft", None)
        cls = CLASSES[kind]
        defined = {f.name for f in dataclasses.fields(cls)}
        unknown = {name: extra.pop(name) for name in list(extra) if name not in defined}
        frame = fr.encode(cls(
            session=session, origin=origin or self.identity, epoch=extra.pop("epoch", self.epoch),
            pos=pos, n=n, tokens=None if tokens is None else fr.pack_tokens(tokens), embd=embd,
            **extra))
        return with_fields(frame, **unknown) if unknown else frame

    def prompt(self, session: int, tokens, pos: int = 0, **extra) -> bytes:
        """A whole prompt as one final chunk (greedy sampling)."""
        extra.setdefault("grammar", None)
        return self.work(fr.PREFILL_FINAL, session, pos, tokens, sampling={}, history=None,
                         **extra)

    def stop(self, session: int, keep: int = 0, prefix_id: bytes | None = None,
             origin: bytes | None = None, tokens=None, salt: bytes | None = None,
             keeper: bytes | None = None) -> bytes:
        return fr.encode(Stop(session=session, origin=origin or self.identity,
                              epoch=self.epoch, keep=keep, prefix_id=prefix_id,
                              tokens=None if tokens is None else fr.pack_tokens(tokens),
                              salt=salt, keeper=keeper))

    def acquire(self, session: int, prefix_id: bytes, n: int,
                origin: bytes | None = None) -> bytes:
        return fr.encode(Acquire(session=session, origin=origin or self.identity,
                                 epoch=self.epoch, prefix_id=prefix_id, n=n))

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self) -> Message:
        return fr.decode(self.sock.recv())

    def drain(self) -> int:
        """Discard what has arrived; returns how many messages."""
        n = 0
        while True:
            try:
                self.sock.recv(zmq.NOBLOCK)
                n += 1
            except zmq.Again:
                return n

    def ask(self, frame: bytes) -> Message:
        self.send(frame)
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
