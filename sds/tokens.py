"""Verify and mint the HS256 JWTs of SDS clients; parse durations like "90s" or "2 days"."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from sds.protocol import SCOPES

ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 16 * 1024
"""Longer tokens are refused unread: real SDS tokens are a few hundred bytes."""


MAX_EXP = 253_402_300_799
"""The last second of the year 9999: a later (or non-finite) ``exp`` is not a time."""


def exp_is_time(exp: Any) -> bool:
    """Whether an ``exp`` claim is a number of seconds a date can hold (not NaN, not 1e300)."""
    return (
        isinstance(exp, int | float)
        and not isinstance(exp, bool)
        and math.isfinite(exp)
        and 0 <= exp <= MAX_EXP
    )


class TokenError(Exception):
    """A token was refused. ``status`` is the HTTP status, ``reason`` a short metric label."""

    def __init__(self, message: str, *, reason: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Claims:
    """The checked claims of an accepted token."""

    sub: str
    aud: str
    scope: str
    exp: float | None
    iss: str | None = None


def verify_token(
    token: str,
    secret: str,
    *,
    store_id: str | None = None,
    issuer: str | None = None,
    leeway: float = 0.0,
) -> Claims:
    """Check signature, algorithm and every claim rule; raise TokenError when refused.

    With ``store_id``, a valid token for another store raises TokenError(status=403).
    """
    if not token:
        raise TokenError("missing token", reason="missing")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token too large", reason="malformed")
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=issuer,
            leeway=leeway,
            options={
                "verify_aud": False,
                "require": ["iss"] if issuer else [],
                "verify_iat": False,
            },
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired", reason="expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not valid yet (nbf)", reason="not_yet_valid") from None
    except jwt.InvalidSignatureError:
        raise TokenError("bad token signature", reason="bad_signature") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("token algorithm must be HS256", reason="bad_algorithm") from None
    except (jwt.InvalidIssuerError, jwt.MissingRequiredClaimError):
        raise TokenError("wrong token issuer", reason="wrong_issuer") from None
    except (jwt.PyJWTError, OverflowError):
        # OverflowError: PyJWT compares an `exp` of Infinity as an integer.
        raise TokenError("malformed token", reason="malformed") from None
    return _check_claims(payload, store_id)


def _check_claims(payload: dict[str, Any], store_id: str | None) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenError("token needs a non-empty `sub`", reason="bad_claims")
    scope = payload.get("scope")
    if scope not in SCOPES:
        raise TokenError("token `scope` must be read, write or admin", reason="bad_claims")
    aud = payload.get("aud")
    if not isinstance(aud, str) or not aud:
        raise TokenError("token `aud` must be a store id", reason="bad_claims")
    exp = payload.get("exp")
    if exp is not None and not exp_is_time(exp):
        raise TokenError("token `exp` must be a time in seconds", reason="bad_claims")
    if store_id is not None and aud != store_id:
        raise TokenError("token is for another store", reason="wrong_store", status=403)
    iss = payload.get("iss")
    return Claims(
        sub=sub,
        aud=aud,
        scope=str(scope),
        exp=float(exp) if exp is not None else None,
        iss=iss if isinstance(iss, str) else None,
    )


def mint_token(
    secret: str,
    *,
    store_id: str,
    scope: str,
    sub: str,
    expires_in: float | None = 24 * 3600,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token for one store; the one place tokens are made (CLI, API, --dev)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if not sub:
        raise ValueError("sub must not be empty")
    if not store_id:
        raise ValueError("store id must not be empty")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "aud": store_id, "scope": scope, "iat": issued}
    if expires_in is not None:
        claims["exp"] = issued + max(1, math.ceil(expires_in))
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a token without checking anything (for `sds token inspect`)."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}", reason="malformed") from None
    return header, claims


_UNITS = {
    "ms": 0.001,
    "msec": 0.001,
    "msecs": 0.001,
    "millisecond": 0.001,
    "milliseconds": 0.001,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 7 * 86400,
    "week": 7 * 86400,
    "weeks": 7 * 86400,
    "y": 365.25 * 86400,
    "yr": 365.25 * 86400,
    "yrs": 365.25 * 86400,
    "year": 365.25 * 86400,
    "years": 365.25 * 86400,
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?|\.\d+) *([a-z]*)$", re.IGNORECASE)
MAX_DURATION_SECONDS = 100 * 365.25 * 86400


def parse_duration(value: str | int | float) -> float:
    """Seconds in a zeit/ms duration: "90s", "30m", "1.5h", "7d", "2 days".

    A number (not a string) is seconds, as jsonwebtoken's expiresIn; a string needs
    a unit, since zeit/ms would read "3600" as milliseconds. Zero, negative and
    unparsable values raise ValueError: an expiry is never silently defaulted.
    """
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '24h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value.strip())
        if not match:
            raise ValueError(f"unparsable duration {value!r} (use forms like 90s, 30m, 1h, 7d)")
        number, unit = match.groups()
        if not unit:
            raise ValueError(
                f"duration {value!r} needs a unit (90s, 30m, 1h, 7d); a JSON number is seconds"
            )
        if unit.lower() not in _UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {value!r}")
        seconds = float(number) * _UNITS[unit.lower()]
    else:
        raise ValueError("a duration must be a number of seconds or a string like '24h'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, not {value!r}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {value!r} is longer than 100 years")
    return seconds
