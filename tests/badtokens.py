"""Hand-made JWTs that a relay must refuse (shared by the token, /ws, /signal and API tests)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from typing import Any

import jwt


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(header: dict[str, Any], claims: dict[str, Any], secret: str | None) -> str:
    """A JWT with exactly this header and these claims, HMAC-SHA256 signed (or unsigned)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims_for(store_id: str, **changes: Any) -> dict[str, Any]:
    """Valid write claims for ``store_id``; a change of None removes that claim."""
    claims: dict[str, Any] = {
        "sub": "mallory",
        "aud": store_id,
        "scope": "write",
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def signed(secret: str, claims: dict[str, Any], algorithm: str = "HS256") -> str:
    """Claims signed as they are (HS256 by hand, so PyJWT cannot tidy odd claim types)."""
    if algorithm == "HS256":
        return forge({"alg": "HS256", "typ": "JWT"}, claims, secret)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short keys for HS384/HS512 are the point here
        return jwt.encode(claims, secret, algorithm=algorithm)


def tamper_signature(token: str) -> str:
    """The same token with one signature byte changed (not a padding bit)."""
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0x01
    return f"{head}.{payload}.{b64(bytes(raw))}"


def tamper_payload(token: str, **changes: Any) -> str:
    """The token with changed claims but its original signature."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{head}.{b64(json.dumps(claims).encode())}.{signature}"


def refused_tokens(secret: str, store_id: str) -> dict[str, str]:
    """Every token the rules of SPEC 3 refuse with 401 for ``store_id`` (server without issuer)."""
    now = int(time.time())
    good = signed(secret, claims_for(store_id))
    return {
        "alg_none": forge({"alg": "none", "typ": "JWT"}, claims_for(store_id), None),
        "alg_none_with_signature": forge(
            {"alg": "none", "typ": "JWT"}, claims_for(store_id), secret
        ),
        "hs512": signed(secret, claims_for(store_id), "HS512"),
        "hs384": signed(secret, claims_for(store_id), "HS384"),
        "rs256_header": forge({"alg": "RS256", "typ": "JWT"}, claims_for(store_id), secret),
        "tampered_signature": tamper_signature(good),
        "tampered_payload": tamper_payload(good, scope="admin"),
        "wrong_secret": signed("another-secret-" + "z" * 40, claims_for(store_id)),
        "expired": signed(secret, claims_for(store_id, iat=now - 7200, exp=now - 60)),
        "nbf_future": signed(secret, claims_for(store_id, nbf=now + 3600)),
        "exp_not_a_number": signed(secret, claims_for(store_id, exp="tomorrow")),
        "missing_sub": signed(secret, claims_for(store_id, sub=None)),
        "empty_sub": signed(secret, claims_for(store_id, sub="")),
        "sub_not_a_string": signed(secret, claims_for(store_id, sub=12345)),
        "sub_a_list": signed(secret, claims_for(store_id, sub=["mallory"])),
        "missing_scope": signed(secret, claims_for(store_id, scope=None)),
        "unknown_scope": signed(secret, claims_for(store_id, scope="owner")),
        "scope_a_list": signed(secret, claims_for(store_id, scope=["write"])),
        "missing_aud": signed(secret, claims_for(store_id, aud=None)),
        "aud_a_list": signed(secret, claims_for(store_id, aud=[store_id])),
        "aud_a_number": signed(secret, claims_for(store_id, aud=7)),
        "huge": signed(secret, claims_for(store_id, padding="p" * 20_000)),
        "garbage": "this is not a token",
        "three_garbage_parts": "abc.def.ghi",
        "empty_parts": "..",
        "not_json": f"{b64(b'{not json')}.{b64(b'also not')}.{b64(b'sig')}",
    }
