"""`sds secret generate`, `sds token mint` and `sds token inspect` (SPEC 8)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result

from sds.cli import cli
from sds.config import SECRET_ENV, SECRET_FILE_ENV, SETTINGS
from sds.tokens import mint_token, verify_token
from tests.badtokens import claims_for, signed, tamper_signature
from tests.helpers import TEST_SECRET, clean_env, run_sds

SECRET = "cli-token-test-secret-0123456789abcdefghij"
UNSET: dict[str, str | None] = {name: None for setting in SETTINGS for name in setting.env} | {
    SECRET_ENV: None,
    SECRET_FILE_ENV: None,
}


def sds(*args: str, **env: str) -> Result:
    """Run the CLI in-process with only the given SDS_* variables set."""
    return CliRunner().invoke(cli, list(args), env={**UNSET, **env}, catch_exceptions=False)


def mint(*extra: str, **env: str) -> Result:
    env.setdefault(SECRET_ENV, SECRET)
    return sds(
        "token", "mint", "--store", "notes", "--scope", "write", "--sub", "ann", *extra, **env
    )


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_secret_generate_is_48_random_bytes_base64url() -> None:
    first, second = sds("secret", "generate"), sds("secret", "generate")
    assert first.exit_code == 0
    value = first.stdout.strip()
    assert first.stdout == value + "\n"
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) == 48
    assert second.stdout.strip() != value


def test_generated_secret_is_accepted_by_the_server_config() -> None:
    value = sds("secret", "generate").stdout.strip()
    token = mint(**{SECRET_ENV: value}).stdout.strip()
    assert verify_token(token, value, store_id="notes").sub == "ann"


def test_mint_prints_a_bare_verifiable_token() -> None:
    result = mint()
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    claims = verify_token(lines[0], SECRET, store_id="notes")
    assert (claims.sub, claims.aud, claims.scope) == ("ann", "notes", "write")
    raw = claims_of(lines[0])
    assert raw["exp"] - raw["iat"] == 86400
    assert "iss" not in raw


@pytest.mark.parametrize(("exp", "seconds"), [("90s", 90), ("2 days", 172800), ("1.5h", 5400)])
def test_mint_exp(exp: str, seconds: int) -> None:
    raw = claims_of(mint("--exp", exp).stdout.strip())
    assert raw["exp"] - raw["iat"] == seconds


def test_mint_issuer_from_option_and_environment() -> None:
    assert claims_of(mint("--issuer", "opt").stdout.strip())["iss"] == "opt"
    assert claims_of(mint(SDS_ISSUER="env").stdout.strip())["iss"] == "env"
    assert claims_of(mint("--issuer", "opt", SDS_ISSUER="env").stdout.strip())["iss"] == "opt"


def test_mint_reads_secret_files(tmp_path: Path) -> None:
    option_file, env_file = tmp_path / "a", tmp_path / "b"
    option_file.write_text("a" * 40 + "\n")
    env_file.write_text("b" * 40)
    token = mint("--jwt-secret-file", str(option_file), **{SECRET_FILE_ENV: str(env_file)})
    assert verify_token(token.stdout.strip(), "a" * 40).aud == "notes"
    token = mint(**{SECRET_FILE_ENV: str(env_file), SECRET_ENV: "c" * 40})
    assert verify_token(token.stdout.strip(), "b" * 40).aud == "notes"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ((), {SECRET_ENV: ""}),
        ((), {SECRET_ENV: "short"}),
        (("--exp", "soon"), {}),
        (("--exp", "3600"), {}),
        (("--exp", "-1h"), {}),
        (("--sub", "  "), {}),
    ],
    ids=["no_secret", "short_secret", "bad_exp", "exp_without_unit", "negative_exp", "blank_sub"],
)
def test_mint_config_errors_exit_2_without_output(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = mint(*args, **env)
    assert result.exit_code == 2
    assert result.stdout == ""


def test_mint_unknown_scope_is_a_usage_error() -> None:
    result = sds(
        "token", "mint", "--store", "s", "--scope", "owner", "--sub", "a", SDS_JWT_SECRET=SECRET
    )
    assert result.exit_code == 2


def test_inspect_valid_token_exits_0_and_shows_claims() -> None:
    token = mint_token(SECRET, store_id="notes", scope="read", sub="bob")
    result = sds("token", "inspect", token, SDS_JWT_SECRET=SECRET)
    assert result.exit_code == 0
    assert "bob" in result.stdout
    assert "notes" in result.stdout
    assert "signature verified" in result.stdout


def test_inspect_json() -> None:
    token = mint_token(SECRET, store_id="notes", scope="read", sub="bob", issuer="iss")
    result = sds("token", "inspect", "--json", token, SDS_JWT_SECRET=SECRET)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert report["verified"] is True
    assert report["claims"]["sub"] == "bob"
    assert report["claims"]["iss"] == "iss"
    assert report["header"]["alg"] == "HS256"
    assert report["expires"]
    assert report["problem"] is None


def test_inspect_expired_exits_1() -> None:
    token = signed(SECRET, claims_for("notes", exp=int(time.time()) - 10))
    result = sds("token", "inspect", "--json", token, SDS_JWT_SECRET=SECRET)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["valid"], report["verified"]) == (False, False)
    assert "expired" in report["problem"]
    # Without a secret the expiry is still checked.
    assert sds("token", "inspect", token).exit_code == 1


def test_inspect_verifies_the_signature_when_a_secret_is_configured(tmp_path: Path) -> None:
    forged = tamper_signature(mint_token(SECRET, store_id="notes", scope="admin", sub="eve"))
    assert sds("token", "inspect", forged, SDS_JWT_SECRET=SECRET).exit_code == 1
    other = mint_token("z" * 40, store_id="notes", scope="admin", sub="eve")
    assert sds("token", "inspect", other, SDS_JWT_SECRET=SECRET).exit_code == 1
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    assert sds("token", "inspect", other, SDS_JWT_SECRET_FILE=str(secret_file)).exit_code == 1


def test_inspect_without_secret_shows_but_does_not_verify() -> None:
    token = mint_token("z" * 40, store_id="notes", scope="write", sub="eve")
    result = sds("token", "inspect", "--json", token)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert (report["valid"], report["verified"]) == (True, False)


@pytest.mark.parametrize("name", ["alg_none", "unknown_scope", "empty_sub"])
def test_inspect_refused_claims_exit_1(name: str) -> None:
    from tests.badtokens import refused_tokens

    token = refused_tokens(SECRET, "notes")[name]
    result = sds("token", "inspect", "--json", token, SDS_JWT_SECRET=SECRET)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["valid"] is False


def test_inspect_checks_the_configured_issuer() -> None:
    token = mint_token(SECRET, store_id="notes", scope="write", sub="eve", issuer="dev")
    assert sds("token", "inspect", token, SDS_JWT_SECRET=SECRET, SDS_ISSUER="prod").exit_code == 1
    assert sds("token", "inspect", token, SDS_JWT_SECRET=SECRET, SDS_ISSUER="dev").exit_code == 0


def test_inspect_garbage_exits_1() -> None:
    result = sds("token", "inspect", "--json", "garbage")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["valid"] is False
    assert sds("token", "inspect", "garbage").exit_code == 1


@pytest.mark.slow
def test_real_process_mint_is_bare_and_errors_are_one_line(tmp_path: Path) -> None:
    result = run_sds(
        "token",
        "mint",
        "--store",
        "notes",
        "--scope",
        "read",
        "--sub",
        "x",
        "--exp",
        "1h",
        env=clean_env({"SDS_ISSUER": "prod"}, secret=TEST_SECRET),
    )
    assert result.returncode == 0
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    claims = verify_token(token, TEST_SECRET, store_id="notes", issuer="prod")
    assert claims.scope == "read"

    inspected = run_sds("token", "inspect", token, env=clean_env(secret=TEST_SECRET))
    assert inspected.returncode == 0

    bad = run_sds("token", "mint", "--store", "n", "--scope", "read", "--sub", "x", env=clean_env())
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr

    invalid = run_sds("token", "inspect", "garbage", env=clean_env())
    assert invalid.returncode == 1
    assert len(invalid.stderr.strip().splitlines()) == 1

    forged = run_sds(
        "token", "inspect", "--json", tamper_signature(token), env=clean_env(secret=TEST_SECRET)
    )
    assert forged.returncode == 1
    assert json.loads(forged.stdout)["valid"] is False


@pytest.mark.parametrize("exp", [1e300, 2**63, float("inf"), float("nan"), -(2**63)])
@pytest.mark.parametrize("with_secret", [True, False])
def test_inspect_exp_that_is_no_time_is_one_line_and_exit_1(exp: float, with_secret: bool) -> None:
    token = signed(SECRET, claims_for("notes", exp=exp))
    env = {SECRET_ENV: SECRET} if with_secret else {}
    result = CliRunner().invoke(cli, ["token", "inspect", token], env={**UNSET, **env})
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sds: invalid token:"), lines
    assert "exp" in lines[0]
    as_json = sds("token", "inspect", "--json", token, **env)
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["valid"] is False and "exp" in report["problem"]


@pytest.mark.parametrize("exp", [1e300, float("inf")])
def test_server_refuses_an_exp_that_is_no_time(exp: float) -> None:
    from sds.tokens import TokenError

    with pytest.raises(TokenError) as refused:
        verify_token(signed(SECRET, claims_for("notes", exp=exp)), SECRET, store_id="notes")
    assert refused.value.status == 401


def test_mint_dev_uses_the_secret_of_sds_serve_dev(tmp_path: Path) -> None:
    (tmp_path / "sds-data").mkdir()
    (tmp_path / "sds-data" / "jwt-secret").write_text(SECRET + "\n")
    env = clean_env()
    without = run_sds(
        "token", "mint", "--store", "demo", "--scope", "read", "--sub", "a", env=env, cwd=tmp_path
    )
    assert without.returncode == 2
    line = without.stderr.strip()
    assert "no JWT secret" in line and "--dev" in line and "sds-data/jwt-secret" in line
    minted = run_sds(
        "token",
        "mint",
        "--dev",
        "--store",
        "demo",
        "--scope",
        "read",
        "--sub",
        "a",
        env=env,
        cwd=tmp_path,
    )
    assert minted.returncode == 0, minted.stderr
    assert verify_token(minted.stdout.strip(), SECRET).aud == "demo"


def test_mint_dev_without_a_dev_secret_file_says_so(tmp_path: Path) -> None:
    result = run_sds(
        "token",
        "mint",
        "--dev",
        "--store",
        "d",
        "--scope",
        "read",
        "--sub",
        "a",
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "sds-data/jwt-secret" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("given_by", ["environment", "option"])
def test_an_unreadable_secret_file_is_an_error_for_mint_and_a_warning_for_inspect(
    tmp_path: Path, given_by: str
) -> None:
    missing = str(tmp_path / "no-such-secret")
    if given_by == "environment":
        env, option = clean_env({SECRET_FILE_ENV: missing}), []
    else:
        env, option = clean_env(), ["--jwt-secret-file", missing]
    minted = run_sds(
        "token", "mint", *option, "--store", "d", "--scope", "read", "--sub", "a", env=env
    )
    assert minted.returncode == 2
    assert "cannot read the JWT secret file" in minted.stderr and minted.stdout == ""
    token = mint_token(SECRET, store_id="d", scope="read", sub="a")
    inspected = run_sds("token", "inspect", *option, token, env=env)
    assert inspected.returncode == 0
    (line,) = inspected.stderr.strip().splitlines()
    assert line.startswith("sds: warning:") and missing in line
