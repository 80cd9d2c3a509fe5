"""Key format, CRC and argon2id hashing (DESIGN §5), property-based.

Parsing is pure and cheap, so the big properties run on ``keys.parse``; argon2 (~25 ms a call) is
exercised only a handful of times.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorry import keys
from lorry.keys import TokenKind

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]
ARGON2_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"
HEADS = {TokenKind.DEPLOYMENT_KEY: "lorry_", TokenKind.ADMIN_TOKEN: "lorry_admin_"}


def spec_crc(body: str) -> str:
    """The format, independently: CRC32 of the ASCII body as 6 base62 digits, most significant first."""
    value = zlib.crc32(body.encode("ascii"))
    digits = ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    assert value == 0
    return digits


def spec_token(kind: TokenKind, kid: str, secret: str) -> str:
    body = f"{HEADS[kind]}{kid}_{secret}"
    return body + spec_crc(body)


@pytest.fixture(scope="module")
def issued() -> dict[TokenKind, list[keys.IssuedToken]]:
    """Three real tokens of each kind (six argon2 hashes for the whole module)."""
    return {kind: [keys.issue(kind) for _ in range(3)] for kind in TokenKind}


kinds = st.sampled_from(list(TokenKind))
kids = st.text(alphabet=BASE62, min_size=12, max_size=12)
secrets_ = st.text(alphabet=BASE62, min_size=43, max_size=43)


# --- format -----------------------------------------------------------------------------------


def test_issued_tokens_have_the_documented_shape(issued: dict[TokenKind, list[keys.IssuedToken]]) -> None:
    for kind, tokens in issued.items():
        for token in tokens:
            head = HEADS[kind]
            assert token.prefix == f"{head}{token.kid}" == keys.display_prefix(kind, token.kid)
            assert re.fullmatch(
                rf"{head}[0-9A-Za-z]{{12}}_[0-9A-Za-z]{{43}}[0-9A-Za-z]{{6}}", token.plaintext
            )
            assert token.plaintext.startswith(token.prefix + "_")
            assert len(token.plaintext) == len(head) + 12 + 1 + 43 + 6
            # The CRC is exactly the documented one, so other implementations can check tokens offline.
            assert token.plaintext == spec_token(kind, token.kid, token.plaintext[len(head) + 13 : -6])
            # Nothing secret in the stored hash or the prefix.
            secret = token.plaintext[len(head) + 13 : -6]
            assert secret not in token.secret_hash and secret not in token.prefix
    plaintexts = [t.plaintext for tokens in issued.values() for t in tokens]
    assert len(set(plaintexts)) == len(plaintexts)
    assert len({t.kid for tokens in issued.values() for t in tokens}) == len(plaintexts)
    assert len({t.plaintext[-49:-6] for tokens in issued.values() for t in tokens}) == len(plaintexts)


def test_secrets_carry_256_bits() -> None:
    assert keys.SECRET_LEN == 43 and keys.KID_LEN == 12 and keys.CRC_LEN == 6
    assert keys.SECRET_LEN * math.log2(62) >= 256
    assert (keys.SECRET_LEN - 1) * math.log2(62) < 256  # and not padded beyond it


def test_random_characters_are_uniform_over_base62() -> None:
    """Chi-squared over 12 000 generated characters: a biased or narrowed alphabet fails this."""
    drawn = "".join(keys.new_kid() for _ in range(1000))
    assert set(drawn) == set(BASE62)
    counts = Counter(drawn)
    expected = len(drawn) / 62
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in BASE62)
    assert chi2 < 120  # 61 degrees of freedom: p < 1e-5 beyond ~115; a broken generator is far above


@given(kind=kinds, kid=kids, secret=secrets_)
def test_parse_accepts_every_well_formed_token(kind: TokenKind, kid: str, secret: str) -> None:
    parsed = keys.parse(spec_token(kind, kid, secret))
    assert parsed == keys.ParsedToken(kind=kind, kid=kid, secret=secret)
    assert parsed.prefix == f"{HEADS[kind]}{kid}"


def test_a_deployment_key_whose_kid_starts_with_admin_is_still_a_deployment_key() -> None:
    token = spec_token(TokenKind.DEPLOYMENT_KEY, "admin0000000", "s" * 43)
    parsed = keys.parse(token)
    assert parsed is not None and parsed.kind is TokenKind.DEPLOYMENT_KEY and parsed.kid == "admin0000000"


# --- every one-character change is rejected without I/O ----------------------------------------


def _all_single_edits(token: str) -> list[str]:
    edits: list[str] = []
    for i, original in enumerate(token):
        edits.extend(token[:i] + c + token[i + 1 :] for c in PRINTABLE if c != original)
        edits.append(token[:i] + token[i + 1 :])
    for i in range(len(token) + 1):
        edits.extend(token[:i] + c + token[i:] for c in PRINTABLE)
    return edits


def test_every_single_character_edit_of_a_real_token_is_rejected(
    issued: dict[TokenKind, list[keys.IssuedToken]],
) -> None:
    checked = 0
    for tokens in issued.values():
        for token in tokens:
            assert keys.parse(token.plaintext) is not None
            for edited in _all_single_edits(token.plaintext):
                assert keys.parse(edited) is None, edited
                checked += 1
    print(f"single-character edits rejected: {checked}")
    assert checked > 6 * 68 * 94 * 2


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=kinds,
    kid=kids,
    secret=secrets_,
    position=st.integers(min_value=0, max_value=10_000),
    replacement=st.characters(),
    how=st.sampled_from(["substitute", "delete", "insert"]),
)
def test_random_single_edits_with_any_unicode_are_rejected(
    kind: TokenKind, kid: str, secret: str, position: int, replacement: str, how: str
) -> None:
    token = spec_token(kind, kid, secret)
    i = position % len(token)
    if how == "substitute":
        if token[i] == replacement:
            return
        edited = token[:i] + replacement + token[i + 1 :]
    elif how == "delete":
        edited = token[:i] + token[i + 1 :]
    else:
        edited = token[:i] + replacement + token[i:]
    assert keys.parse(edited) is None


@pytest.mark.parametrize(
    "variant",
    [" {t}", "{t} ", "{t}\n", "\t{t}", "Bearer {t}", "{t}{t}", "{T}", "LORRY_{rest}", "{t}\x00"],
)
def test_wrapped_or_recased_tokens_are_rejected(variant: str) -> None:
    token = spec_token(TokenKind.DEPLOYMENT_KEY, "abcDEF012345", "x" * 43)
    assert keys.parse(token) is not None
    candidate = variant.format(t=token, T=token.upper(), rest=token[len("lorry_") :])
    assert keys.parse(candidate) is None


# --- parse never raises ------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.text())
def test_parse_never_raises_on_text(value: str) -> None:
    assert keys.parse(value) is None


@settings(max_examples=300)
@given(st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")))
def test_parse_never_raises_on_latin1(value: str) -> None:
    assert keys.parse(value) is None


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(exclude_categories=()), min_size=60, max_size=80))
def test_parse_never_raises_on_token_length_strings_with_surrogates(value: str) -> None:
    assert keys.parse(value) is None


@given(kind=kinds, kid=kids, secret=secrets_, junk=st.text(alphabet=BASE62, min_size=1))
def test_parse_rejects_valid_tokens_with_appended_characters(
    kind: TokenKind, kid: str, secret: str, junk: str
) -> None:
    assert keys.parse(spec_token(kind, kid, secret) + junk) is None


@pytest.mark.parametrize("size", [10**5, 10**7])
def test_parse_rejects_very_long_strings_quickly(size: int) -> None:
    token = spec_token(TokenKind.ADMIN_TOKEN, "k" * 12, "s" * 43)
    for value in ["a" * size, token * (size // len(token)), "lorry_" + "0" * size, "\udcff" * size]:
        assert keys.parse(value) is None


@pytest.mark.parametrize("value", [None, 42, b"lorry_", ["lorry_"], object()])
def test_parse_never_raises_on_non_strings(value: object) -> None:
    assert keys.parse(value) is None  # type: ignore[arg-type]


# --- argon2id --------------------------------------------------------------------------------


def test_round_trip_and_argon2id_parameters(issued: dict[TokenKind, list[keys.IssuedToken]]) -> None:
    for kind in TokenKind:
        token = issued[kind][0]
        parsed = keys.parse(token.plaintext)
        assert parsed is not None
        assert (parsed.kind, parsed.kid, parsed.prefix) == (kind, token.kid, token.prefix)
        assert keys.verify_secret(token.secret_hash, parsed.secret) is True
    hashes = [t.secret_hash for tokens in issued.values() for t in tokens]
    for secret_hash in hashes:
        assert secret_hash.startswith(ARGON2_PREFIX), secret_hash
    # Random salts: every hash is distinct, even of the same secret.
    assert len(set(hashes)) == len(hashes)
    again = keys.hash_secret("same secret")
    assert again != keys.hash_secret("same secret") and again.startswith(ARGON2_PREFIX)


def test_verification_rejects_other_secrets_and_bad_hashes(
    issued: dict[TokenKind, list[keys.IssuedToken]],
) -> None:
    first, second = issued[TokenKind.DEPLOYMENT_KEY][:2]
    second_secret = keys.parse(second.plaintext)
    assert second_secret is not None
    assert keys.verify_secret(first.secret_hash, second_secret.secret) is False
    first_secret = keys.parse(first.plaintext)
    assert first_secret is not None
    assert keys.verify_secret(first.secret_hash, first_secret.secret[:-1] + "!") is False
    # A malformed stored hash verifies nothing and does not raise.
    for broken in [
        "",
        "not a hash",
        ARGON2_PREFIX,
        first.secret_hash[:-4],
        "$argon2i$v=19$m=8,t=1,p=1$AAAA$AAAA",
    ]:
        assert keys.verify_secret(broken, first_secret.secret) is False
