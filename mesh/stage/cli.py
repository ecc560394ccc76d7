"""``mesh-stage``: serve one layer range of a model on one ROUTER socket."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

# Before any import starts a thread (numpy's BLAS pool, llama.cpp's, ZeroMQ's): every thread
# inherits this mask, so SIGTERM reaches only the thread that waits for it (mesh.shutdown).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import click  # noqa: E402

from mesh.config import LOOPBACK, STAGE, is_loopback  # noqa: E402
from mesh.errors import MeshError  # noqa: E402
from mesh.stage.exactness import DEFAULT_MODE, MODES, kv_type_for  # noqa: E402
from mesh.transport import wire  # noqa: E402


def parse_layers(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected START:END, got {text!r}") from None
    return start, end


def normalize_listen(text: str) -> str:
    """``PORT`` or ``HOST:PORT`` or a full zmq URL; a bare port binds loopback only."""
    if "://" in text:
        return text
    if text.isdigit():
        return f"tcp://{LOOPBACK}:{text}"
    return f"tcp://{text}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_spec", default=None,
              help="GGUF path, or 'default'. Required unless --join (then the coordinator "
                   "places the model's layers).")
@click.option("--layers", default=None,
              help="Half-open layer range START:END; with --join, a range this host must "
                   "serve (pinned).")
@click.option("--join", "join_url", default=None,
              help="Coordinator join URL (`mesh serve` prints the line to run): the "
                   "coordinator measures this host and assigns its layers.")
@click.option("--listen", default=None,
              help=f"ZeroMQ URL to bind [default: tcp://{LOOPBACK}:{STAGE.listen_port}; with "
                   f"--join, tcp://0.0.0.0:{STAGE.listen_port}].")
@click.option("--advertise", default=None,
              help="With --join: the URL other hosts reach this stage at [default: this "
                   "host's address on the route to the coordinator].")
@click.option("--name", "member_name", default=None,
              help="With --join: this host's name in plans [default: its hostname].")
@click.option("--memory", "mem_bytes", default=None, type=click.IntRange(1),
              help="With --join: bytes of memory this stage may use [default: what the host "
                   "has available].")
@click.option("--ctx", "n_ctx", default=STAGE.ctx, show_default=True,
              help="KV cells of one session (its own stream; rounded up to 256).")
@click.option("--slots", "n_seq_max", default=STAGE.slots, show_default=True,
              help="Sessions held at once: live sessions + resident prefixes. "
                   "KV memory is ctx x slots cells.")
@click.option("--threads", "n_threads", default=STAGE.threads, show_default=True)
@click.option("--gpu-layers", "n_gpu_layers", default=STAGE.gpu_layers, show_default=True)
@click.option("--batch", "n_batch", default=STAGE.batch, show_default=True,
              help="Most tokens in one frame.")
@click.option("--prefix-records", default=None, type=int,
              help="Most prefix records (resident prefixes) kept [default: slots/2].")
@click.option("--batching", type=click.Choice(MODES), default=DEFAULT_MODE,
              show_default=True,
              help="invariant: a session's tokens never depend on what else runs (bf16 K "
                   "and f16 V cells); exact: they also equal one llama.cpp process (f16 "
                   "cells; past 256 tokens at >1 thread rows run one at a time); all: batch "
                   "every session (outputs depend on load).")
@click.option("--secret", "secret_file", envvar="MESH_SECRET_FILE", default=None,
              type=click.Path(dir_okay=False), help="Mesh secret (`mesh secret FILE`) or a "
              "stage identity (`mesh secret MASTER --member stage FILE`): only members can "
              "reach the stage (CURVE).")
@click.option("--insecure", is_flag=True,
              help="Listen beyond loopback without a secret: anyone reaching the port is "
                   "trusted.")
@click.option("--lease-s", "lease_s", default=STAGE.lease_s, show_default=True,
              help="Seconds a session's owner may stay silent before its sessions are dropped.")
@click.option("--compute-lock", default=None, type=click.Path(dir_okay=False),
              help="A file the stages sharing this host's cores lock around each llama.cpp "
                   "step, so they take turns instead of slowing each other (`mesh up` "
                   "passes one when its stages' threads outnumber the cores).")
@click.option("--log-level", default="info", show_default=True)
def main(model_spec, layers, join_url, listen, advertise, member_name, mem_bytes, n_ctx,
         n_seq_max, n_threads, n_gpu_layers, n_batch, prefix_records, batching, secret_file,
         insecure, lease_s, compute_lock, log_level) -> None:
    """Serve layers START:END of a GGUF model as one pipeline stage, or join a coordinator
    that places them."""
    # llama.cpp's CPU graph runs on OpenMP here; idle OpenMP workers spin for ~300k iterations
    # by default and steal the core from the stage that is computing (0.52x -> 0.85x of one
    # process at 1000). Much below 10k the threads sleep at the graph's own barriers (stage 0's
    # slept ~10 times a token each at 1000, 2.5 at 10k): 10k is 0.4-0.56 ms a token faster than
    # 1000 in paired runs (README, Benchmarks). Set before llama.cpp (and libgomp) load.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    # SIGTERM is taken by a thread of its own: the main thread computes, and a signal handler
    # there would wait for the step in progress.
    from mesh.shutdown import take_lifeline, take_sigterm

    stop: list = []
    take_sigterm(stop)
    take_lifeline(stop)  # started by `mesh up`: stop when it dies, even by SIGKILL
    from mesh.logs import configure

    configure(log_level)
    if join_url is None and (model_spec is None or layers is None):
        _exit("give --model and --layers START:END, or --join URL")
    url = normalize_listen(listen or (f"tcp://0.0.0.0:{STAGE.listen_port}" if join_url
                                      else f"tcp://{LOOPBACK}:{STAGE.listen_port}"))
    if secret_file is None and not insecure and not (
            is_loopback(url) and (join_url is None or is_loopback(join_url))):
        _exit(f"refusing to listen on {url} without a mesh secret: give --secret FILE "
              "(`mesh secret FILE` makes one), or --insecure")
    options = _Options(n_ctx, n_seq_max, n_threads, n_gpu_layers, n_batch, prefix_records,
                       batching, lease_s, compute_lock)
    try:
        from mesh.model.source import resolve_model
        from mesh.transport.security import ROLE_STAGE, load_keys

        keys = load_keys(secret_file, ROLE_STAGE) if secret_file else None
        path = resolve_model(model_spec) if model_spec is not None else None
        pinned = parse_layers(layers) if layers is not None else None
    except MeshError as exc:
        _exit(str(exc))
    if join_url is not None:
        _joined(join_url, path, pinned, url, advertise, member_name, mem_bytes, options, keys,
                stop)
        return
    assert path is not None and pinned is not None
    _serve(path, pinned, url, options, keys, stop)


@dataclass(frozen=True)
class _Options:
    n_ctx: int
    n_seq_max: int
    n_threads: int
    n_gpu_layers: int
    n_batch: int
    prefix_records: int | None
    batching: str
    lease_s: float
    compute_lock: str | None

    def kv_type(self, mixed_kv: bool) -> str:
        return kv_type_for(self.batching, mixed_kv)


def _exit(message: str) -> NoReturn:
    click.echo(f"mesh-stage: {message}", err=True)
    sys.exit(2)


def _build(files, url: str, options: _Options, keys):
    """The runtime and server of one slice (one clear line and exit if they cannot start)."""
    from mesh.model.slicing import release_readers
    from mesh.stage.runtime import RuntimeConfig, StageRuntime
    from mesh.stage.server import StageServer

    release_readers()  # a cold cache parsed the source GGUF: do not keep it resident
    config = RuntimeConfig(n_ctx=options.n_ctx, n_seq_max=options.n_seq_max,
                           n_threads=options.n_threads, n_gpu_layers=options.n_gpu_layers,
                           n_batch=options.n_batch,
                           n_ubatch=min(options.n_batch, STAGE.ubatch),
                           kv_type=options.kv_type(files.model.mixed_kv),
                           compute_lock=options.compute_lock)
    runtime = StageRuntime(files, config)
    try:
        server = StageServer(runtime, url, files.model.sha256,
                             prefix_records=options.prefix_records, batching=options.batching,
                             keys=keys, lease_s=options.lease_s)
    except BaseException:
        runtime.close()
        raise
    return runtime, server


def _run(runtime, server, stop: list) -> None:
    """Serve until stopped; the runtime is closed after."""
    from mesh.logs import get_logger

    # The transport thread answers within a GIL switch interval of the compute thread's Python;
    # 5 ms (the default) would add up to that to every hand-off between them.
    sys.setswitchinterval(STAGE.switch_interval_s)
    stop.append(server.stop)  # a step in progress finishes first, within the grace period
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.remove(server.stop)
        runtime.close()
        get_logger("mesh.stage").info("stage_stopped", stage=server.name)


def _serve(path: Path, layers: tuple[int, int], url: str, options: _Options, keys,
           stop: list) -> None:
    from mesh.model.slicing import slice_model

    try:
        runtime, server = _build(slice_model(path, *layers), url, options, keys)
    except MeshError as exc:
        _exit(str(exc))
    except Exception as exc:  # zmq bind errors and the like: one clear line, no traceback
        _exit(f"cannot start on {url}: {exc}")
    _run(runtime, server, stop)


def _joined(join_url: str, path: Path | None, pinned: tuple[int, int] | None, url: str,
            advertise: str | None, member_name: str | None, mem_bytes: int | None,
            options: _Options, keys, stop: list) -> None:
    """Offer this host to the coordinator at ``join_url``; serve what it assigns, until
    stopped (a later assignment replaces the range being served)."""
    import queue
    import socket
    import threading

    import zmq

    from mesh.logs import get_logger
    from mesh.model.slicing import model_info, slice_model
    from mesh.shipping.fetch import fetch_slice
    from mesh.stage.join import JoinConnection, advertised_url, ready
    from mesh.stage.probe import measure
    from mesh.transport.messages import Join
    from mesh.transport.sockets import valid_url

    log = get_logger("mesh.stage")
    if not valid_url(join_url):
        _exit(f"--join must be a tcp://HOST:PORT URL, got {join_url!r}")
    try:
        info = model_info(path) if path is not None else None
        measured = measure(path, options.n_threads, options.kv_type(
            info.mixed_kv if info is not None else True), mem_bytes)
        public = advertise or advertised_url(url, join_url)
    except (MeshError, OSError) as exc:
        _exit(str(exc))
    name = (member_name or socket.gethostname() or public)[:wire.MAX_MEMBER_NAME_CHARS]
    stopping = threading.Event()
    stop.append(stopping.set)
    conn = JoinConnection(join_url, keys, zmq.Context.instance())
    hello = Join(
        name=name, url=public, mem_bytes=measured.mem_bytes, threads=options.n_threads,
        ctx=options.n_ctx, slots=options.n_seq_max,
        model_sha256=info.sha256 if info is not None else None,
        probe_layer=measured.probe_layer, layer_us=measured.layer_us,
        head_us=measured.head_us, pinned_start=pinned[0] if pinned else None,
        pinned_end=pinned[1] if pinned else None)
    conn.start(hello)
    click.echo(f"mesh-stage: joining {join_url} as {name} ({public}); waiting for layers",
               err=True)
    try:
        while not stopping.is_set():
            try:
                probe = conn.probes.get_nowait()
            except queue.Empty:
                pass
            else:
                hello = _measured(conn, probe, hello, options)
                continue
            try:
                assign = conn.assignments.get(timeout=0.5)
            except queue.Empty:
                continue
            if assign.start == assign.end:
                log.info("standing_by", reason=assign.reason[:200])
                click.echo(f"mesh-stage: standing by: {assign.reason}", err=True)
                continue
            try:
                if path is not None and info is not None and assign.model_sha256 == info.sha256:
                    files = slice_model(path, assign.start, assign.end)
                else:
                    files = fetch_slice(conn, assign.model_sha256, assign.start, assign.end,
                                        _progress(assign))
                runtime, server = _build(files, url, options, keys)
            except Exception as exc:
                conn.send(ready(assign, public, f"cannot serve {assign.start}:{assign.end}: "
                                                f"{exc}"[:400]))
                continue
            conn.on_assign(server.stop)
            conn.send(ready(assign, public))
            click.echo(f"mesh-stage: serving layers {assign.start}:{assign.end} at {public}",
                       err=True)
            _run(runtime, server, stop)
            conn.on_assign(None)
    finally:
        conn.close()


def _measured(conn, probe, hello, options: _Options):
    """Fetch the one layer the coordinator sent to measure, time it, and join again with the
    measure (with none if it could not: the coordinator then stops waiting for it)."""
    import dataclasses

    from mesh.logs import get_logger
    from mesh.shipping.fetch import fetch_slice
    from mesh.stage.probe import step_us

    try:
        files = fetch_slice(conn, probe.model_sha256, probe.layer, probe.layer + 1)
        layer_us = step_us(files, options.n_threads, options.kv_type(files.model.mixed_kv))
    except Exception as exc:
        get_logger("mesh.stage").warning("probe_failed", error=str(exc)[:200])
        layer_us = 0
    measured = dataclasses.replace(hello, probe_layer=probe.layer, layer_us=layer_us)
    conn.offer(measured)
    return measured


def _progress(assign):
    """A progress line on stderr, at most once per 5% of a slice being received."""
    shown = [-1]

    def show(done: int, total: int) -> None:
        step = 20 * done // max(1, total)
        if step != shown[0]:
            shown[0] = step
            click.echo(f"mesh-stage: receiving layers {assign.start}:{assign.end}: "
                       f"{done >> 20} of {total >> 20} MiB", err=True)

    return show


if __name__ == "__main__":
    main()
