"""A mesh only its members can talk to: the secret, CURVE, ZAP, and who may send what."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from mesh.coordinator.coordinator import GenerationParams
from mesh.launcher import free_port
from mesh.transport import frames as fr
from mesh.transport.security import (
    SecretError,
    derive_keys,
    load_secret,
    write_secret,
)
from tests.meshutil import running_mesh, with_coordinator
from tests.rawpeer import RawPeer

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "protocol.md"


def test_key_derivation_matches_the_protocol_vector():
    block = re.search(r"```keys\n(.*?)```", PROTOCOL_MD.read_text(), re.DOTALL).group(1)
    vector = dict(line.split() for line in block.strip().splitlines())
    keys = derive_keys(bytes.fromhex(vector["secret"]))
    assert keys.server.public.decode() == vector["server"]
    assert keys.coordinator.public.decode() == vector["coordinator"]
    assert keys.stage.public.decode() == vector["stage"]
    assert len({keys.server.public, keys.coordinator.public, keys.stage.public}) == 3


def test_secret_files_are_private_and_never_overwritten(tmp_path):
    path = tmp_path / "mesh.secret"
    write_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(load_secret(path)) == 32
    with pytest.raises(SecretError, match="never overwritten"):
        write_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        load_secret(path)
    bad = tmp_path / "bad"
    bad.write_text("not hex\n")
    os.chmod(bad, 0o600)
    with pytest.raises(SecretError, match="does not hold a mesh secret"):
        load_secret(bad)


def test_a_stage_refuses_to_listen_beyond_loopback_without_a_secret(tiny_llama):
    args = [sys.executable, "-m", "mesh.stage.cli", "--model", str(tiny_llama), "--layers",
            "0:4", "--listen", f"tcp://0.0.0.0:{free_port()}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without a mesh secret" in proc.stderr


@pytest.fixture(scope="module")
def secure(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    secret = tmp / "mesh.secret"
    write_secret(secret)
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp, ctx=256, slots=4,
                      secret=secret) as mesh:
        yield mesh, derive_keys(load_secret(secret))


def test_members_generate_and_outsiders_get_no_reply(secure, tiny_llama, tmp_path):
    mesh, keys = secure

    async def body(coord):
        return await coord.complete([1, 50, 60, 70], GenerationParams(max_tokens=4))
    result = with_coordinator(tiny_llama, mesh.urls, body, keys=keys)
    assert len(result.token_ids) == 4

    other = derive_keys(os.urandom(32))
    for peer_keys in (None, other):  # no CURVE, or CURVE without the secret
        pair = peer_keys.coordinator if peer_keys else None
        with RawPeer(mesh.urls[0], keys=peer_keys, pair=pair, timeout_ms=3000,
                     learn_epoch=False) as outsider:
            assert outsider.ping() is None
            try:
                outsider.send(outsider.prompt(1, [1, 2]))
            except zmq.Again:
                pass
    with RawPeer(mesh.urls[0], keys=keys, pair=keys.coordinator) as member:
        pong = member.ping()
        assert pong["kind"] == fr.PONG and pong["sessions"] == 0 and pong["queue"] == 0


def test_members_may_only_send_what_their_role_and_sessions_allow(secure):
    mesh, keys = secure
    coordinator = RawPeer(mesh.urls[0], b"coord-one", keys=keys, pair=keys.coordinator)
    stage_peer = RawPeer(mesh.urls[0], b"fwd-peer", keys=keys, pair=keys.stage)
    try:
        assert stage_peer.handshake()["code"] == "forbidden"
        # A coordinator naming another coordinator's session is refused.
        reply = coordinator.ask(coordinator.work(fr.PREFILL, 5, 0, [1, 2],
                                                 origin=b"coord-other"))
        assert reply["code"] == "forbidden" and reply["session"] is None
        reply = coordinator.ask(coordinator.stop(5, origin=b"coord-other"))
        assert reply["code"] == "forbidden"
        assert coordinator.ping()["sessions"] == 0
    finally:
        coordinator.close()
        stage_peer.close()


def test_generate_cli_with_the_secret(secure, tiny_llama):
    mesh, _ = secure
    secret = Path(mesh.secret)
    args = [sys.executable, "-m", "mesh.cli", "generate", "--model", str(tiny_llama),
            "--prompt", "a mesh stage", "--max-tokens", "3", "--json"]
    for url in mesh.urls:
        args += ["--stage", url]
    ok = subprocess.run([*args, "--secret", str(secret)], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*args, "--connect-timeout", "2"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "handshake" in refused.stderr
