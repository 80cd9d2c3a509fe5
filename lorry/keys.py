"""Deployment keys and admin tokens: generation, parsing, CRC and argon2id hashing (DESIGN §5).

Format: ``lorry_<kid>_<secret><crc>`` and ``lorry_admin_<kid>_<secret><crc>``.
``kid`` is 12 base62 chars, ``secret`` 43 base62 chars (256 random bits), ``crc`` 6 base62 chars
of CRC32 over everything before it. Parsing never raises and does no I/O.
"""

from __future__ import annotations

import enum
import re
import secrets
import zlib
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import Type

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KID_LEN = 12
SECRET_LEN = 43  # ceil(256 / log2(62))
CRC_LEN = 6
_B62 = f"[{ALPHABET}]"
_PATTERN = re.compile(
    rf"lorry_(?P<admin>admin_)?(?P<kid>{_B62}{{{KID_LEN}}})_(?P<secret>{_B62}{{{SECRET_LEN}}})(?P<crc>{_B62}{{{CRC_LEN}}})"
)
MAX_TOKEN_LEN = len("lorry_admin_") + KID_LEN + 1 + SECRET_LEN + CRC_LEN

# m=19 MiB, t=2, p=1: OWASP's argon2id baseline.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, type=Type.ID)


class TokenKind(enum.StrEnum):
    DEPLOYMENT_KEY = "key"
    ADMIN_TOKEN = "admin"


@dataclass(frozen=True, slots=True)
class ParsedToken:
    kind: TokenKind
    kid: str
    secret: str

    @property
    def prefix(self) -> str:
        return display_prefix(self.kind, self.kid)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    plaintext: str
    kid: str
    prefix: str
    secret_hash: str


def _encode_base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def _crc(body: str) -> str:
    return _encode_base62(zlib.crc32(body.encode("ascii")), CRC_LEN)


def _head(kind: TokenKind) -> str:
    return "lorry_admin_" if kind is TokenKind.ADMIN_TOKEN else "lorry_"


def display_prefix(kind: TokenKind, kid: str) -> str:
    return f"{_head(kind)}{kid}"


def new_kid() -> str:
    return _random_base62(KID_LEN)


def issue(kind: TokenKind) -> IssuedToken:
    """A fresh token; its plaintext must be shown once and then dropped."""
    kid = new_kid()
    secret = _random_base62(SECRET_LEN)
    body = f"{_head(kind)}{kid}_{secret}"
    return IssuedToken(
        plaintext=body + _crc(body),
        kid=kid,
        prefix=display_prefix(kind, kid),
        secret_hash=hash_secret(secret),
    )


def parse(token: str) -> ParsedToken | None:
    """The token's parts when its syntax and CRC are right, else None. No I/O, never raises."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        return None
    match = _PATTERN.fullmatch(token)
    if match is None:
        return None
    if _crc(token[:-CRC_LEN]) != match["crc"]:
        return None
    kind = TokenKind.ADMIN_TOKEN if match["admin"] else TokenKind.DEPLOYMENT_KEY
    return ParsedToken(kind=kind, kid=match["kid"], secret=match["secret"])


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def verify_secret(secret_hash: str, secret: str) -> bool:
    """Constant-time argon2id verification; a malformed stored hash verifies nothing."""
    try:
        return _HASHER.verify(secret_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
