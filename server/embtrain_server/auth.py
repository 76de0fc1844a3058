"""Bearer-token authentication. Tokens come from a file (one ``principal:token`` per line) or the ``tokens``
setting (``principal:token,principal:token``); each token names a principal. The check compares SHA-256 digests
(fixed length) with ``hmac.compare_digest`` against every configured token without stopping at a match, so its
time reveals neither which token matched, nor how much of one, nor a token's length."""

from __future__ import annotations

import hashlib
import hmac
import pathlib
from collections.abc import Iterable, Mapping

from .errors import Unauthenticated

ANONYMOUS = "anonymous"


def parse_tokens(lines: Iterable[str], source: str) -> dict[str, str]:
    """principal:token lines -> {token: principal}. Blank lines and '#' comments are skipped."""
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        principal, sep, token = line.partition(":")
        principal, token = principal.strip(), token.strip()
        if not sep or not principal or not token:
            raise ValueError(f"{source}:{i}: expected 'principal:token'")
        if len(token) < 16:
            raise ValueError(f"{source}:{i}: token for {principal!r} is shorter than 16 characters")
        if token in out:
            raise ValueError(f"{source}:{i}: token of {principal!r} is also the token of {out[token]!r}")
        out[token] = principal
    return out


def load_tokens(token_file: str, tokens: str) -> dict[str, str]:
    found: dict[str, str] = {}
    if token_file:
        found.update(parse_tokens(pathlib.Path(token_file).read_text().splitlines(), token_file))
    if tokens:
        found.update(parse_tokens(tokens.split(","), "tokens (EMBTRAIN_TOKENS)"))
    return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Authenticator:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(_digest(t.encode()), p) for t, p in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def principal(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        if not self._tokens:
            return ANONYMOUS
        header = next((v for k, v in metadata if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("authorization: missing; send the metadata 'authorization: Bearer <token>'",
                                  field="authorization")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization: expected 'Bearer <token>'", field="authorization")
        given = _digest(token.strip().encode("utf-8", "surrogateescape"))
        match = None
        for known, principal in self._tokens:  # no early exit: constant time in the number of tokens
            if hmac.compare_digest(known, given):
                match = principal
        if match is None:
            raise Unauthenticated("authorization: unknown token", field="authorization")
        return match
