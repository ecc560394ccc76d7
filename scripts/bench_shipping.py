"""Slice shipping throughput: a slice of the default model fetched over tcp loopback.

    python scripts/bench_shipping.py [--model default] [--layers 9:18] [--curve] [--chunk-mib 4]

The sender slices in its own cache first (not timed); the receiver fetches into an empty cache.
Prints the bytes, seconds and MB/s of the fetch (manifest, chunks, checks, rename).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import zmq

from mesh.model.source import resolve_model
from mesh.shipping import DealerChannel, SliceSender, SliceServer, fetch_slice, slice_dealer
from mesh.transport.security import derive_keys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", default="9:18")
    parser.add_argument("--curve", action="store_true")
    parser.add_argument("--chunk-mib", type=float, default=4)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    start, end = (int(v) for v in args.layers.split(":"))
    path = resolve_model(args.model, progress=False)
    keys = derive_keys(os.urandom(32)) if args.curve else None
    caches = [tempfile.mkdtemp(prefix="ship-sender-"), tempfile.mkdtemp(prefix="ship-receiver-")]
    try:
        os.environ["MESH_CACHE_DIR"] = caches[0]
        sender = SliceSender(path, chunk_bytes=int(args.chunk_mib * (1 << 20)))
        sender.prepare(start, end)
        os.environ["MESH_CACHE_DIR"] = caches[1]
        with SliceServer(sender, "tcp://127.0.0.1:*", keys) as server, zmq.Context() as zctx:
            sock = slice_dealer(zctx, server.url, keys)
            channel = DealerChannel(sock)
            began = time.perf_counter()
            files = fetch_slice(channel, sender.sha256, start, end, window=args.window)
            seconds = time.perf_counter() - began
            sock.close(linger=0)
        size = sum(p.stat().st_size for p in files.directory.iterdir())
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"layers {start}:{end}  curve={args.curve}  chunk={args.chunk_mib:g} MiB  "
          f"window={args.window}: {size / 1e6:.1f} MB in {seconds:.2f} s = "
          f"{size / 1e6 / seconds:.0f} MB/s (received {channel.bytes_received / size:.4f}x)")


if __name__ == "__main__":
    main()
