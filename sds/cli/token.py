"""``sds secret generate``, ``sds token mint`` and ``sds token inspect``."""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import time
from typing import Any

import click

from sds.cli.options import (
    TOKEN_SETTINGS,
    ConfigFailure,
    config_from,
    print_table,
    setting_options,
)
from sds.protocol import SCOPES
from sds.tokens import (
    TokenError,
    decode_unverified,
    exp_is_time,
    mint_token,
    parse_duration,
    verify_token,
)

SECRET_BYTES = 48


@click.group()
def secret() -> None:
    """Make JWT secrets."""


@secret.command("generate")
def secret_generate() -> None:
    """Print a new random secret (48 random bytes, base64url).

    \b
    Example:
      sds secret generate > /etc/sds/jwt-secret && chmod 600 /etc/sds/jwt-secret
    """
    value = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    click.echo(value)


@click.group()
def token() -> None:
    """Mint and inspect client tokens."""


@token.command("mint")
@click.option("--store", "store_id", required=True, help="Store id (the token's aud).")
@click.option("--scope", required=True, type=click.Choice(SCOPES), help="read, write or admin.")
@click.option("--sub", required=True, help="Subject: who the token is for.")
@click.option("--exp", default="24h", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d, 2 days.")
@setting_options(*TOKEN_SETTINGS)
def token_mint(store_id: str, scope: str, sub: str, exp: str, **options: Any) -> None:
    """Sign a token offline with the configured secret; prints it bare for $(...).

    \b
    Examples:
      sds token mint --store notes --scope write --sub alice
      TOKEN=$(sds token mint --store notes --scope read --sub bob --exp 1h)
    """
    config = config_from(options)
    try:
        expires_in = parse_duration(exp)
    except ValueError as exc:
        raise ConfigFailure(f"--exp: {exc}") from None
    if not sub.strip():
        raise ConfigFailure("--sub must not be empty")
    if not store_id:
        raise ConfigFailure("--store must not be empty")
    click.echo(
        mint_token(
            config.jwt_secret,
            store_id=store_id,
            scope=scope,
            sub=sub,
            expires_in=expires_in,
            issuer=config.issuer,
        )
    )


@token.command("inspect")
@click.argument("jwt_token", metavar="TOKEN")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@setting_options(*TOKEN_SETTINGS)
def token_inspect(jwt_token: str, as_json: bool, **options: Any) -> None:
    """Show a token's claims and expiry; verify it when a secret is configured.

    Exit 1 when the token is invalid or expired.

    \b
    Examples:
      sds token inspect "$TOKEN"
      sds token inspect --json "$TOKEN" | jq .claims.sub
    """
    config = config_from(options, require_secret=False)
    try:
        header, claims = decode_unverified(jwt_token)
    except TokenError as exc:
        _report_invalid(as_json, exc.message)
        return
    if "exp" in claims and not exp_is_time(claims["exp"]):
        _report_invalid(as_json, "`exp` is not a time in seconds (a number from 0 to year 9999)")
        return
    problem = _token_problem(jwt_token, claims, config.jwt_secret, config.issuer)
    verified = bool(config.jwt_secret) and problem is None
    report: dict[str, Any] = {
        "valid": problem is None,
        "verified": verified,
        "header": header,
        "claims": claims,
        "expires": _when(claims.get("exp")),
        "problem": problem,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)
    if problem is not None:
        raise click.exceptions.Exit(1)


def _token_problem(
    jwt_token: str, claims: dict[str, Any], secret_value: str, issuer: str | None
) -> str | None:
    """Why the token would be refused, or None."""
    store = claims.get("aud") if isinstance(claims.get("aud"), str) else None
    if secret_value:
        try:
            verify_token(jwt_token, secret_value, store_id=store, issuer=issuer)
        except TokenError as exc:
            return exc.message
        return None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp <= time.time():
        return "token expired"
    return None


def _when(exp: Any) -> str | None:
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    moment = dt.datetime.fromtimestamp(exp, tz=dt.UTC)
    left = exp - time.time()
    relative = f"in {_span(left)}" if left > 0 else f"{_span(-left)} ago"
    return f"{moment.isoformat(timespec='seconds')} ({relative})"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _report_invalid(as_json: bool, message: str) -> None:
    if as_json:
        click.echo(json.dumps({"valid": False, "verified": False, "problem": message}))
    else:
        click.echo(f"sds: invalid token: {message}", err=True)
    raise click.exceptions.Exit(1)


def _print_report(report: dict[str, Any]) -> None:
    from rich.text import Text

    rows: list[list[str | Text]] = [
        [name, str(value)] for name, value in sorted(report["claims"].items())
    ]
    rows.append(["alg", str(report["header"].get("alg"))])
    if report["expires"]:
        rows.append(["expires", report["expires"]])
    if report["problem"]:
        status = Text.assemble(("INVALID", "red"), f": {report['problem']}")
    elif report["verified"]:
        status = Text.assemble(("valid", "green"), " (signature verified)")
    else:
        status = Text.assemble(("not verified", "yellow"), " (no secret configured)")
    rows.append(["status", status])
    print_table(["claim", "value"], rows, header=False)
