"""The mesh secret and member identities as files and keys (split from
tests/e2e/test_mesh_security.py): key derivation against protocol.md's vector, private secret
files, what each member identity holds, tenant salts. No process, no model."""

import hashlib
import os
import re
from pathlib import Path

import pytest
import zmq

from mesh.coordinator.connections import StageConnection
from mesh.errors import SecretError
from mesh.transport.security import (
    ROLE_COORDINATOR,
    ROLE_STAGE,
    derive_keys,
    load_keys,
    load_secret,
    salt_key_of,
    tenant_salt,
    write_member,
    write_secret,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "protocol.md"


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """A master secret and the stage and coordinator identities made from it."""
    tmp = tmp_path_factory.mktemp("identities")
    master, stage, coordinator = tmp / "mesh.secret", tmp / "stage.id", tmp / "coordinator.id"
    write_secret(master)
    write_member(master, ROLE_STAGE, stage)
    write_member(master, ROLE_COORDINATOR, coordinator)
    return master, stage, coordinator


def test_key_derivation_matches_the_protocol_vector():
    block = re.search(r"```keys\n(.*?)```", PROTOCOL_MD.read_text(), re.DOTALL).group(1)
    vector = dict(line.split() for line in block.strip().splitlines())
    keys = derive_keys(bytes.fromhex(vector["secret"]))
    assert keys.server.public.decode() == vector["server"]
    assert keys.coordinator.public.decode() == vector["coordinator"]
    assert keys.stage.public.decode() == vector["stage"]
    assert len({keys.server.public, keys.coordinator.public, keys.stage.public}) == 3
    assert keys.salt_key.hex() == vector["salt_key"] and keys.keeper.hex() == vector["keeper"]
    assert tenant_salt(keys.salt_key, b"key-1").hex() == vector["tenant:key-1"]


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


def test_member_identities_hold_only_their_role(identities, tmp_path):
    master, stage_file, coordinator_file = identities
    keys = derive_keys(load_secret(master))
    stage = load_keys(stage_file, ROLE_STAGE)
    coordinator = load_keys(coordinator_file, ROLE_COORDINATOR)
    for path in (stage_file, coordinator_file):
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(SecretError, match="never overwritten"):
            write_member(master, ROLE_STAGE, path)
    # A stage holds the server and stage keypairs and the coordinator's public key only.
    assert (stage.server, stage.stage) == (keys.server, keys.stage)
    assert stage.coordinator.public == keys.coordinator.public
    assert stage.coordinator.secret is None and stage.salt_key is None and stage.keeper is None
    text = stage_file.read_text()
    for secret in (master.read_text().strip(), keys.coordinator.secret.decode(),
                   keys.salt_key.hex()):
        assert secret not in text
    # A coordinator holds its keypair, the public keys and the salt key; no stage secret.
    assert coordinator.coordinator == keys.coordinator and coordinator.keeper == keys.keeper
    assert coordinator.server.secret is None and coordinator.stage.secret is None
    assert keys.server.secret.decode() not in coordinator_file.read_text()
    # Each refuses the other's role; neither is a master secret to derive from.
    with pytest.raises(SecretError, match="stage identity cannot act as a coordinator"):
        load_keys(stage_file, ROLE_COORDINATOR)
    with pytest.raises(SecretError, match="coordinator identity cannot act as a stage"):
        load_keys(coordinator_file, ROLE_STAGE)
    for path in (stage_file, coordinator_file):
        with pytest.raises(SecretError, match="does not hold a mesh secret"):
            load_secret(path)
        with pytest.raises(SecretError, match="does not hold a mesh secret"):
            write_member(path, ROLE_STAGE, tmp_path / f"from-{path.name}")
    with pytest.raises(SecretError, match="cannot act as a coordinator"):
        StageConnection(0, "tcp://127.0.0.1:1", b"coord-x", zmq.Context(),
                  lambda *_: None, keys=stage)
    copy = tmp_path / "copy.id"
    copy.write_text(stage_file.read_text())
    os.chmod(copy, 0o640)
    with pytest.raises(SecretError, match="readable by others"):
        load_keys(copy)
    os.chmod(copy, 0o600)
    copy.write_text(stage_file.read_text().replace("stage-secret", "salt-key"))
    with pytest.raises(SecretError, match="a stage identity holds exactly"):
        load_keys(copy)


def test_tenant_salts_are_keyed_hmacs_of_the_api_key(identities):
    salt_key = load_keys(identities[2], ROLE_COORDINATOR).salt_key
    salt = tenant_salt(salt_key, b"key-1")
    assert len(salt) == 16 and salt != tenant_salt(salt_key, b"key-2")
    assert salt != hashlib.sha256(b"mesh-tenant|key-1").digest()[:16]  # the unkeyed hash
    assert salt != tenant_salt(os.urandom(32), b"key-1")
    assert salt_key_of(None) == salt_key_of(None) and len(salt_key_of(None)) == 32
