"""Pure token logic: verify_token's claim rules, mint_token, and zeit/ms durations."""

from __future__ import annotations

import contextlib
import math
import time

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sds.tokens import (
    MAX_DURATION_SECONDS,
    TokenError,
    decode_unverified,
    mint_token,
    parse_duration,
    verify_token,
)
from tests.badtokens import claims_for, refused_tokens, signed

SECRET = "token-test-secret-0123456789abcdefghijklmn"
STORE = "notes"
BAD = refused_tokens(SECRET, STORE)


@pytest.mark.parametrize("name", sorted(BAD))
def test_refused_token_is_401(name: str) -> None:
    with pytest.raises(TokenError) as caught:
        verify_token(BAD[name], SECRET, store_id=STORE)
    assert caught.value.status == 401
    assert caught.value.reason


@pytest.mark.parametrize("name", sorted(BAD))
def test_refusal_message_never_holds_the_token_or_secret(name: str) -> None:
    with pytest.raises(TokenError) as caught:
        verify_token(BAD[name], SECRET, store_id=STORE)
    assert BAD[name] not in caught.value.message
    assert SECRET not in caught.value.message


def test_missing_token_is_401() -> None:
    with pytest.raises(TokenError) as caught:
        verify_token("", SECRET, store_id=STORE)
    assert (caught.value.status, caught.value.reason) == (401, "missing")


def test_valid_token_for_another_store_is_403() -> None:
    token = mint_token(SECRET, store_id="other", scope="write", sub="u")
    with pytest.raises(TokenError) as caught:
        verify_token(token, SECRET, store_id=STORE)
    assert (caught.value.status, caught.value.reason) == (403, "wrong_store")


def test_invalid_token_for_another_store_is_401_not_403() -> None:
    token = signed(SECRET, claims_for("other", scope="owner"))
    with pytest.raises(TokenError) as caught:
        verify_token(token, SECRET, store_id=STORE)
    assert caught.value.status == 401


@pytest.mark.parametrize("scope", ["read", "write", "admin"])
def test_every_scope_is_accepted(scope: str) -> None:
    claims = verify_token(
        mint_token(SECRET, store_id=STORE, scope=scope, sub="ann"), SECRET, store_id=STORE
    )
    assert (claims.sub, claims.aud, claims.scope) == ("ann", STORE, scope)


def test_token_without_exp_is_accepted() -> None:
    token = signed(SECRET, claims_for(STORE, exp=None))
    assert verify_token(token, SECRET, store_id=STORE).exp is None


def test_nbf_in_the_past_is_accepted() -> None:
    token = signed(SECRET, claims_for(STORE, nbf=int(time.time()) - 5))
    assert verify_token(token, SECRET, store_id=STORE).sub == "mallory"


def test_iat_in_the_future_is_not_a_reason_to_refuse() -> None:
    # Clocks drift; the spec checks exp and nbf only.
    token = signed(SECRET, claims_for(STORE, iat=int(time.time()) + 600))
    assert verify_token(token, SECRET, store_id=STORE).aud == STORE


def test_issuer_is_ignored_when_the_server_has_none() -> None:
    token = signed(SECRET, claims_for(STORE, iss="anyone"))
    assert verify_token(token, SECRET, store_id=STORE).iss == "anyone"


def test_configured_issuer_must_match() -> None:
    good = signed(SECRET, claims_for(STORE, iss="sds-prod"))
    assert verify_token(good, SECRET, store_id=STORE, issuer="sds-prod").iss == "sds-prod"
    for bad in (
        signed(SECRET, claims_for(STORE, iss="sds-test")),
        signed(SECRET, claims_for(STORE)),
        signed(SECRET, claims_for(STORE, iss=["sds-prod"])),
    ):
        with pytest.raises(TokenError) as caught:
            verify_token(bad, SECRET, store_id=STORE, issuer="sds-prod")
        assert caught.value.status == 401


def test_without_store_id_any_audience_string_is_accepted() -> None:
    token = mint_token(SECRET, store_id="whatever", scope="admin", sub="root")
    assert verify_token(token, SECRET).aud == "whatever"


def test_minted_token_claims() -> None:
    token = mint_token(
        SECRET, store_id=STORE, scope="read", sub="bob", expires_in=90, issuer="me", now=1000
    )
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert claims == {
        "sub": "bob",
        "aud": STORE,
        "scope": "read",
        "iat": 1000,
        "exp": 1090,
        "iss": "me",
    }


def test_minted_token_without_issuer_has_no_iss_and_rounds_up_expiry() -> None:
    token = mint_token(SECRET, store_id=STORE, scope="read", sub="bob", expires_in=0.1, now=50)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "iss" not in claims
    assert claims["exp"] - claims["iat"] == 1


@pytest.mark.parametrize(
    "changes", [{"scope": "owner"}, {"sub": ""}, {"store_id": ""}], ids=["scope", "sub", "store"]
)
def test_mint_refuses_bad_claims(changes: dict[str, str]) -> None:
    arguments = {"store_id": STORE, "scope": "write", "sub": "u", **changes}
    with pytest.raises(ValueError):
        mint_token(SECRET, **arguments)


def test_decode_unverified_shows_claims_of_a_foreign_token() -> None:
    token = mint_token("x" * 40, store_id=STORE, scope="write", sub="eve")
    header, claims = decode_unverified(token)
    assert header["alg"] == "HS256"
    assert claims["sub"] == "eve"
    with pytest.raises(TokenError):
        decode_unverified("garbage")


EXPIRY_DURATIONS = [
    ("90s", 90),
    ("30m", 1800),
    ("1h", 3600),
    ("7d", 7 * 86400),
    ("2 days", 2 * 86400),
    ("1.5h", 5400),
]
"""Expiry texts and their seconds, for every place that takes one (also /api/token)."""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        *EXPIRY_DURATIONS,
        ("1 hour", 3600),
        ("2 weeks", 14 * 86400),
        ("1y", 365.25 * 86400),
        ("500ms", 0.5),
        ("10 Minutes", 600),
        (" 24h ", 86400),
        (".5d", 43200),
    ],
)
def test_zeit_ms_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_json_number_is_seconds() -> None:
    assert parse_duration(3600) == 3600
    assert parse_duration(1.5) == 1.5


@pytest.mark.parametrize(
    "value",
    [
        "",
        "3600",
        "h",
        "1 fortnight",
        "-1h",
        "0s",
        "1e3s",
        "1h30m",
        "abc",
        "1..5h",
        "0",
        0,
        -5,
        True,
        float("nan"),
        float("inf"),
        None,
        [],
        "101y",
    ],
)
def test_unparsable_duration_raises_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


@given(st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parse_duration_is_positive_or_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)  # type: ignore[arg-type]
    except ValueError:
        return
    assert seconds > 0
    assert math.isfinite(seconds)
    assert seconds <= MAX_DURATION_SECONDS


@given(
    st.integers(min_value=1, max_value=10_000),
    st.sampled_from([("s", 1), ("m", 60), ("h", 3600), ("d", 86400), (" days", 86400)]),
)
def test_number_and_unit_multiply(number: int, unit: tuple[str, int]) -> None:
    assert parse_duration(f"{number}{unit[0]}") == number * unit[1]


@given(st.text(alphabet="0123456789. smhdwyaeiknorsu", max_size=12))
def test_duration_like_text_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) > 0
