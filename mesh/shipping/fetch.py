"""Slices over ZeroMQ: ``fetch_slice`` drives a SliceReceiver over a DEALER; ``serve_slices``
answers it from a ROUTER with a SliceSender.

The receiver keeps a small window of chunk requests outstanding, so a slow or distant link
stays busy while the sender reads the next chunk, without queueing a slice's worth of memory at
either end: both sockets keep only a few messages per peer (``SHIPPING_HWM``).

    # the peer holding the model
    router = slice_router(zctx, "tcp://*:7600", keys)
    serve_slices(router, SliceSender(model_path), stop_event)
    # the host that needs layers 9:18
    files = fetch_slice(DealerChannel(slice_dealer(zctx, url, keys)), sha, 9, 18, progress)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import zmq

from mesh.errors import ProtocolError, ShippingError
from mesh.logs import get_logger
from mesh.model.slicing import StageFiles, cached_slice
from mesh.shipping.receiver import SliceReceiver
from mesh.shipping.sender import SENDER_NAME, SliceSender
from mesh.transport import wire
from mesh.transport.frames import decode, encode, error_message
from mesh.transport.messages import Chunk, Error, Message, SliceManifest, SliceRequest
from mesh.transport.security import MeshKeys, ZapGuard, curve_client, curve_server
from mesh.transport.sockets import bound

log = get_logger("mesh.shipping")

WINDOW = 4  # chunk requests outstanding at once
REPLY_TIMEOUT_S = 60.0  # silence (no reply at all) after which a fetch gives up
MAX_STRAYS = 64  # replies matching no request a fetch tolerates (e.g. from a timed-out try)
SHIPPING_HWM = 8  # messages queued per peer on shipping sockets
# The largest message a shipping socket takes: a chunk, or a manifest (its info and a digest
# per chunk), each with room for the frame's other fields.
SHIPPING_MAX_MESSAGE = max(wire.MAX_CHUNK_BYTES, wire.MAX_MODEL_INFO_BYTES
                           + wire.SHA256_BYTES * wire.MAX_SLICE_CHUNKS) + 64 * 1024

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
M = TypeVar("M", SliceManifest, Chunk)


class Channel(Protocol):
    """What ``fetch_slice`` needs of a connection: send a request, wait for a reply."""

    def send(self, msg: Message) -> None: ...

    def recv(self, timeout_s: float) -> Message | None:
        """The next reply, or None after ``timeout_s`` without one."""


class DealerChannel:
    """A Channel over a DEALER socket (``slice_dealer``); counts the bytes it receives."""

    def __init__(self, sock: zmq.Socket[Any]):
        self.sock = sock
        self.bytes_received = 0

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_s: float) -> Message | None:
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        parts = self.sock.recv_multipart(copy=True)
        self.bytes_received += sum(len(part) for part in parts)
        if len(parts) != 1:
            raise ShippingError(f"the slice sender sent a message of {len(parts)} frames")
        try:
            return decode(parts[0])
        except ProtocolError as exc:
            raise ShippingError(f"the slice sender sent a bad frame: {exc}", exc.code) from None


def _shipping_socket(zctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = zctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SHIPPING_HWM)
    sock.setsockopt(zmq.RCVHWM, SHIPPING_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, SHIPPING_MAX_MESSAGE)
    return sock


def slice_dealer(zctx: zmq.Context[Any], url: str, keys: MeshKeys | None = None) -> zmq.Socket[Any]:
    """A connection to a slice sender; with ``keys`` as a stage member (CURVE)."""
    sock = _shipping_socket(zctx, zmq.DEALER)
    if keys is not None:
        curve_client(sock, keys, keys.stage)
    sock.connect(url)
    return sock


def slice_router(zctx: zmq.Context[Any], url: str, keys: MeshKeys | None = None) -> zmq.Socket[Any]:
    """A slice sender's listening socket; with ``keys`` a CURVE server (a ``ZapGuard`` on
    ``zctx`` admits the members)."""
    sock = _shipping_socket(zctx, zmq.ROUTER)
    if keys is not None:
        curve_server(sock, keys)
    return bound(sock, url)


def fetch_slice(channel: Channel, model_sha256: str, start: int, end: int,
                progress: Progress | None = None, window: int = WINDOW,
                timeout_s: float = REPLY_TIMEOUT_S, max_attempts: int = 3) -> StageFiles:
    """The slice ``[start, end)`` of model ``model_sha256``: from the cache if it is whole
    there, else fetched over ``channel`` (resuming what an earlier fetch left on disk).
    Raises ShippingError (ManifestError, ChunkError) saying why it could not."""
    files = cached_slice(model_sha256, start, end)
    if files is not None:
        return files
    began = time.monotonic()
    channel.send(SliceRequest(model_sha256=model_sha256, start=start, end=end))
    strays = [0]
    manifest = _reply(channel, SliceManifest, timeout_s, strays)
    with SliceReceiver(manifest, model_sha256, start, end, max_attempts) as receiver:
        if progress is not None:
            progress(receiver.bytes_done, receiver.bytes_total)
        while not receiver.complete:
            while receiver.outstanding < window and (request := receiver.next_request()):
                channel.send(request)
            if not receiver.accept(_reply(channel, Chunk, timeout_s, strays)):
                _stray(strays)
            elif progress is not None:
                progress(receiver.bytes_done, receiver.bytes_total)
        files = receiver.finish()
        seconds = time.monotonic() - began
        log.info("slice_fetched", start=start, end=end, bytes=receiver.bytes_total,
                 resumed=receiver.resumed_bytes, seconds=round(seconds, 2))
    return files


def _reply(channel: Channel, kind: type[M], timeout_s: float, strays: list[int]) -> M:
    """The next reply of ``kind``; an Error from the sender, or silence, ends the fetch."""
    while True:
        msg = channel.recv(timeout_s)
        if msg is None:
            raise ShippingError(f"no reply from the slice sender for {timeout_s:g} s")
        if isinstance(msg, kind):
            return msg
        if isinstance(msg, Error):
            raise ShippingError(f"the slice sender refused: {msg.message}", msg.code)
        _stray(strays)


def _stray(strays: list[int]) -> None:
    strays[0] += 1
    if strays[0] > MAX_STRAYS:
        raise ShippingError(f"the slice sender sent more than {MAX_STRAYS} replies to nothing "
                            "asked")


def serve_slices(sock: zmq.Socket[Any], sender: SliceSender, stop: threading.Event,
                 poll_ms: int = 100) -> None:
    """Answer shipping requests on ROUTER ``sock`` until ``stop`` is set (one thread owns the
    socket and the sender). Nothing a peer sends ends the loop: a bad frame gets an Error."""
    while not stop.is_set():
        if not sock.poll(poll_ms, zmq.POLLIN):
            continue
        parts = sock.recv_multipart(copy=True)
        identity, frames = parts[0], parts[1:]
        reply: Message
        if len(frames) != 1:
            reply = error_message(wire.E_BAD_FRAME, "a shipping request is one frame", None,
                                  SENDER_NAME)
        else:
            try:
                reply = sender.handle(decode(frames[0]))
            except ProtocolError as exc:
                reply = error_message(exc.code, str(exc), None, SENDER_NAME)
            except Exception as exc:  # a bug must not stop the sender for every peer
                log.exception("slice_request_failed", error=type(exc).__name__)
                reply = error_message(wire.E_INTERNAL, "the slice sender failed", None,
                                      SENDER_NAME)
        try:
            sock.send_multipart([identity, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer left, or does not read its replies: drop this one
            log.warning("slice_reply_dropped", kind=reply.kind)


class SliceServer:
    """``serve_slices`` on a thread of its own, over a ROUTER bound to ``url`` (a port of
    ``*`` picks a free one: ``self.url`` says which); with ``keys`` only members get in.
    A context manager: leaving it stops the thread and closes the socket."""

    def __init__(self, sender: SliceSender, url: str, keys: MeshKeys | None = None):
        self._zctx: zmq.Context[Any] = zmq.Context()
        self._guard = ZapGuard(self._zctx, keys) if keys is not None else None
        try:
            self._sock = slice_router(self._zctx, url, keys)
        except BaseException:
            self._close_context()
            raise
        self.url: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=serve_slices, name="slice-server",
                                        args=(self._sock, sender, self._stop), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)
        self._close_context()

    def _close_context(self) -> None:
        if self._guard is not None:
            self._guard.stop()
        self._zctx.term()

    def __enter__(self) -> SliceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
