"""Log-probabilities as OpenAI defines them, for chat and for completions.

Each generated token is named by the text it adds to the answer. A token that ends inside a
multi-byte character adds nothing; the token that completes the character adds all of it
(llama-server does the same). So the token texts join to exactly the answer's text, and
``bytes`` are the UTF-8 bytes of that text. An alternative in ``top_logprobs`` is named by its
own piece: the valid UTF-8 prefix as ``token``, and every byte of the piece in ``bytes``.
"""

from __future__ import annotations

from typing import Any

from mesh.coordinator.tokenizer import Tokenizer

# Logprobs of -inf (a token the sampler ruled out) are not JSON: the lowest float stands in.
_LOWEST = -3.4028234663852886e38


def _lp(value: float | None) -> float:
    return _LOWEST if value is None or value == float("-inf") else value


def _valid_prefix(piece: bytes) -> str:
    """The longest prefix of ``piece`` that is whole UTF-8 characters."""
    for cut in range(len(piece), max(len(piece) - 4, -1), -1):
        try:
            return piece[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return piece.decode("utf-8", "replace")


def trim(entries: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The entries whose texts make up ``text`` (a stop string cut the rest off)."""
    out: list[dict[str, Any]] = []
    used = 0
    for entry in entries:
        if used >= len(text) and out:
            break
        part = entry["text"][:max(0, len(text) - used)]
        out.append({**entry, "text": part})
        used += len(part)
    return out


def chat(entries: list[dict[str, Any]], tokenizer: Tokenizer) -> dict[str, Any]:
    def alternative(token: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.piece(token)
        return {"token": _valid_prefix(piece), "bytes": list(piece), "logprob": _lp(logprob)}

    return {"content": [
        {"token": e["text"], "bytes": list(e["text"].encode("utf-8")),
         "logprob": _lp(e["logprob"]), "top_logprobs": [alternative(t, lp) for t, lp in e["top"]]}
        for e in entries], "refusal": None}


def completion(entries: list[dict[str, Any]], tokenizer: Tokenizer, offset: int = 0
               ) -> dict[str, Any]:
    """``offset``: where the first entry's text starts in the answer (streams go on)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["text"])
    return {"tokens": [e["text"] for e in entries],
            "token_logprobs": [_lp(e["logprob"]) for e in entries],
            "top_logprobs": [{_valid_prefix(tokenizer.piece(t)): _lp(lp) for t, lp in e["top"]}
                             for e in entries],
            "text_offset": offsets}
