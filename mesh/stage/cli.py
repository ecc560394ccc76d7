"""``mesh-stage``: serve one layer range of a model on one ROUTER socket."""

from __future__ import annotations

import os
import signal
import sys

# Before any import starts a thread (numpy's BLAS pool, llama.cpp's, ZeroMQ's): every thread
# inherits this mask, so SIGTERM reaches only the thread that waits for it (mesh.shutdown).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import click  # noqa: E402

from mesh.config import LOOPBACK, STAGE, is_loopback  # noqa: E402
from mesh.errors import MeshError  # noqa: E402
from mesh.stage.exactness import DEFAULT_MODE, MODES, kv_type_for  # noqa: E402


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
@click.option("--model", "model_spec", required=True, help="GGUF path, or 'default'.")
@click.option("--layers", required=True, help="Half-open layer range START:END.")
@click.option("--listen", default=f"tcp://{LOOPBACK}:{STAGE.listen_port}", show_default=True,
              help="ZeroMQ URL to bind (loopback unless told otherwise).")
@click.option("--ctx", "n_ctx", default=STAGE.ctx, show_default=True,
              help="KV cells of one session (its own stream; rounded up to 256).")
@click.option("--slots", "n_seq_max", default=STAGE.slots, show_default=True,
              help="Sessions held at once: live sessions + cached prefixes. "
                   "KV memory is ctx x slots cells.")
@click.option("--threads", "n_threads", default=STAGE.threads, show_default=True)
@click.option("--gpu-layers", "n_gpu_layers", default=STAGE.gpu_layers, show_default=True)
@click.option("--batch", "n_batch", default=STAGE.batch, show_default=True,
              help="Most tokens in one frame.")
@click.option("--prefix-records", default=None, type=int,
              help="Most resident prompt prefixes kept [default: slots/2].")
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
@click.option("--log-level", default="info", show_default=True)
def main(model_spec, layers, listen, n_ctx, n_seq_max, n_threads, n_gpu_layers, n_batch,
         prefix_records, batching, secret_file, insecure, lease_s, log_level) -> None:
    """Serve layers START:END of a GGUF model as one pipeline stage."""
    # llama.cpp's CPU graph runs on OpenMP here; idle OpenMP workers spin for ~300k iterations
    # by default and steal the core from the stage that is computing. A short spin keeps the
    # barriers inside a graph fast (measured: 0.52x -> 0.85x of one process, scripts/bench_mesh).
    # Set before llama.cpp (and libgomp) load.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    # SIGTERM is taken by a thread of its own: the main thread computes, and a signal handler
    # there would wait for the step in progress.
    from mesh.shutdown import take_sigterm

    stop: list = []
    take_sigterm(stop)
    from mesh.logs import configure, get_logger
    from mesh.model.slicing import release_readers, slice_model
    from mesh.model.source import resolve_model
    from mesh.stage.runtime import RuntimeConfig, StageRuntime
    from mesh.stage.server import StageServer
    from mesh.transport.security import ROLE_STAGE, load_keys

    configure(log_level)
    log = get_logger("mesh.stage")
    start, end = parse_layers(layers)
    url = normalize_listen(listen)
    if secret_file is None and not insecure and not is_loopback(url):
        click.echo(f"mesh-stage: refusing to listen on {url} without a mesh secret: give "
                   "--secret FILE (`mesh secret FILE` makes one), or --insecure", err=True)
        sys.exit(2)
    try:
        keys = load_keys(secret_file, ROLE_STAGE) if secret_file else None
        path = resolve_model(model_spec)
        files = slice_model(path, start, end)
        release_readers()  # a cold cache parsed the source GGUF: do not keep it resident
        config = RuntimeConfig(n_ctx=n_ctx, n_seq_max=n_seq_max, n_threads=n_threads,
                               n_gpu_layers=n_gpu_layers, n_batch=n_batch,
                               n_ubatch=min(n_batch, STAGE.ubatch),
                               kv_type=kv_type_for(batching, files.model.mixed_kv))
        runtime = StageRuntime(files, config)
        server = StageServer(runtime, url, files.model.sha256, prefix_records=prefix_records,
                             batching=batching, keys=keys, lease_s=lease_s)
    except MeshError as exc:
        click.echo(f"mesh-stage: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # zmq bind errors and the like: one clear line, no traceback
        click.echo(f"mesh-stage: cannot start on {url}: {exc}", err=True)
        sys.exit(2)
    # The transport thread answers within a GIL switch interval of the compute thread's Python;
    # 5 ms (the default) would add up to that to every hand-off between them.
    sys.setswitchinterval(STAGE.switch_interval_s)
    stop.append(server.stop)  # a step in progress finishes first, within the grace period
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.close()
        log.info("stage_stopped", stage=server.name)


if __name__ == "__main__":
    main()
