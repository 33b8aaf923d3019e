"""Configuration: CLI option > environment variable > default, validated once (SPEC 2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from sds.config import (
    MIN_SECRET_LENGTH,
    SETTINGS,
    Config,
    ConfigError,
    check_persist_dir,
    load_config,
)
from sds.tokens import mint_token
from tests.helpers import TEST_SECRET, clean_env, free_port, spawn_server

SECRET = "config-test-secret-0123456789abcdefghijkl"
ENV = {"SDS_JWT_SECRET": SECRET}


def test_defaults_match_the_spec() -> None:
    config = load_config(environ=ENV)
    assert config.issuer is None
    assert config.port == 3000
    assert config.host == "127.0.0.1"
    assert config.persist_dir is None
    assert config.value_mode == "blob"
    assert config.sync == "normal"
    assert config.max_frame_bytes == 32 * 1024 * 1024
    assert config.max_store_id_length == 128
    assert config.max_request_bytes == 64 * 1024
    assert config.permessage_deflate is False
    assert config.allowed_origins == ()


def test_environment_beats_default() -> None:
    config = load_config(
        environ={
            **ENV,
            "SDS_PORT": "4100",
            "SDS_HOST": "0.0.0.0",
            "SDS_ISSUER": "iss-env",
            "SDS_PERSIST_DIR": "/tmp/sds-env",
            "SDS_VALUE_MODE": "snapshot",
            "SDS_SYNC": "full",
            "SDS_MAX_FRAME_BYTES": "1_000_000",
            "SDS_MAX_STORE_ID_LENGTH": "16",
            "SDS_ALLOWED_ORIGINS": "https://a.example, https://b.example",
            "SDS_PERMESSAGE_DEFLATE": "yes",
        }
    )
    assert config.port == 4100
    assert config.host == "0.0.0.0"
    assert config.issuer == "iss-env"
    assert config.persist_dir == Path("/tmp/sds-env")
    assert config.value_mode == "snapshot"
    assert config.sync == "full"
    assert config.max_frame_bytes == 1_000_000
    assert config.max_store_id_length == 16
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.permessage_deflate is True


def test_option_beats_environment() -> None:
    config = load_config(
        {"port": "5000", "issuer": "iss-opt", "sync": "normal", "allowed_origins": ("https://o",)},
        environ={
            **ENV,
            "SDS_PORT": "4100",
            "SDS_ISSUER": "iss-env",
            "SDS_SYNC": "full",
            "SDS_ALLOWED_ORIGINS": "https://e",
        },
    )
    assert (config.port, config.issuer, config.sync) == (5000, "iss-opt", "normal")
    assert config.allowed_origins == ("https://o",)


def test_option_not_given_falls_back_to_environment() -> None:
    config = load_config({"port": None, "allowed_origins": ()}, environ={**ENV, "SDS_PORT": "4100"})
    assert config.port == 4100


def test_empty_environment_variable_counts_as_unset() -> None:
    assert load_config(environ={**ENV, "SDS_PORT": ""}).port == 3000


def test_persistence_dir_alias() -> None:
    config = load_config(environ={**ENV, "SDS_PERSISTENCE_DIR": "/srv/old-guide"})
    assert config.persist_dir == Path("/srv/old-guide")


def test_persist_dir_wins_over_its_alias() -> None:
    config = load_config(
        environ={**ENV, "SDS_PERSIST_DIR": "/srv/new", "SDS_PERSISTENCE_DIR": "/srv/old"}
    )
    assert config.persist_dir == Path("/srv/new")


def test_secret_from_environment() -> None:
    assert load_config(environ=ENV).jwt_secret == SECRET


def test_secret_from_secret_file_env(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    config = load_config(environ={"SDS_JWT_SECRET_FILE": str(path)})
    assert config.jwt_secret == SECRET


def test_secret_priority_option_file_then_env_file_then_env(tmp_path: Path) -> None:
    option_file = tmp_path / "option"
    env_file = tmp_path / "env"
    option_file.write_text("o" * 40)
    env_file.write_text("f" * 40)
    environ = {"SDS_JWT_SECRET": "e" * 40, "SDS_JWT_SECRET_FILE": str(env_file)}
    assert load_config(environ=environ, secret_file=option_file).jwt_secret == "o" * 40
    assert load_config(environ=environ).jwt_secret == "f" * 40
    assert load_config(environ={"SDS_JWT_SECRET": "e" * 40}).jwt_secret == "e" * 40


def test_secret_never_in_repr() -> None:
    assert SECRET not in repr(load_config(environ=ENV))


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({}, "no JWT secret"),
        ({"SDS_JWT_SECRET": "x" * (MIN_SECRET_LENGTH - 1)}, "at least 32"),
        ({**ENV, "SDS_PORT": "http"}, "SDS_PORT"),
        ({**ENV, "SDS_PORT": "65536"}, "port"),
        ({**ENV, "SDS_VALUE_MODE": "tree"}, "SDS_VALUE_MODE"),
        ({**ENV, "SDS_SYNC": "always"}, "SDS_SYNC"),
        ({**ENV, "SDS_MAX_FRAME_BYTES": "0"}, "max-frame-bytes"),
        ({**ENV, "SDS_HEARTBEAT": "soon"}, "SDS_HEARTBEAT"),
        ({**ENV, "SDS_PERMESSAGE_DEFLATE": "perhaps"}, "SDS_PERMESSAGE_DEFLATE"),
    ],
)
def test_bad_values_raise_one_line_config_error(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_option_is_named_by_its_flag() -> None:
    with pytest.raises(ConfigError, match="--port"):
        load_config({"port": "eighty"}, environ=ENV)


def test_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(environ={"SDS_JWT_SECRET_FILE": str(tmp_path / "absent")})


def test_secret_not_required_for_offline_inspection() -> None:
    assert load_config(environ={}, require_secret=False).jwt_secret == ""


def test_replace_validates_again() -> None:
    config = load_config(environ=ENV)
    assert config.replace(port=1234).port == 1234
    with pytest.raises(ConfigError):
        config.replace(port=-1)


def test_config_is_keyword_only_and_frozen() -> None:
    config = Config(jwt_secret=SECRET)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_every_setting_has_an_env_var_and_a_field() -> None:
    fields = set(Config.__dataclass_fields__)
    for setting in SETTINGS:
        assert setting.name in fields
        assert setting.env and all(name.startswith("SDS_") for name in setting.env)


def test_persist_dir_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="persist dir"):
        check_persist_dir(tmp_path / "file" / "sub")


def test_persist_dir_is_created(tmp_path: Path) -> None:
    check_persist_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []


@pytest.mark.slow
async def test_sds_serve_reads_environment_and_options_win(tmp_path: Path) -> None:
    """End to end: env sets port, issuer and (alias) persist dir; --issuer overrides SDS_ISSUER."""
    port = free_port()
    env = clean_env(
        {
            "SDS_PORT": str(port),
            "SDS_ISSUER": "from-env",
            "SDS_PERSISTENCE_DIR": str(tmp_path / "stores"),
        },
        secret=TEST_SECRET,
    )
    with spawn_server(
        ["--issuer", "from-option"], env=env, cwd=tmp_path, port=port, port_option=False
    ) as server:
        status, body = server.healthz()
        assert (status, body["persistence"]) == (200, True)
        assert (tmp_path / "stores").is_dir()

        async def status_for(issuer: str) -> int:
            token = mint_token(TEST_SECRET, store_id="s", scope="write", sub="u", issuer=issuer)
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(f"{server.ws_url}/ws/s?token={token}") as ws,
                ):
                    await ws.close()
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

        assert await asyncio.wait_for(status_for("from-option"), 10) == 101
        assert await asyncio.wait_for(status_for("from-env"), 10) == 401


def serve_options(args: list[str]) -> dict[str, object]:
    """What `sds serve ARGS` passes to the config, parsed by click without running."""
    from sds.cli.serve import serve

    params = dict(serve.make_context("serve", args).params)
    params.pop("dev")
    return params


def test_serve_cli_spells_options_as_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from sds.cli.options import config_from

    monkeypatch.setenv("SDS_JWT_SECRET", SECRET)
    for name in ("SDS_ALLOWED_ORIGINS", "SDS_PERMESSAGE_DEFLATE", "SDS_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = config_from(
        serve_options(
            [
                "--allowed-origin",
                "https://a.example",
                "--allowed-origin",
                "https://b.example",
                "--permessage-deflate",
                "--port",
                "4444",
            ]
        )
    )
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.permessage_deflate is True
    assert config.port == 4444
    assert config_from(serve_options([])).permessage_deflate is False


def test_every_setting_is_an_option_of_serve() -> None:
    from sds.cli.serve import serve

    flags = {flag for param in serve.params for flag in getattr(param, "opts", [])}
    for setting in SETTINGS:
        assert setting.option in flags
    assert "--jwt-secret-file" in flags
