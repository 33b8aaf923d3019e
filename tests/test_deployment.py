"""deployment/: each config checked by the tool that runs it (skipped locally without it, never in CI).

The proxies are also run for real in tests/test_proxy_configs.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.deploy_tools import require_tool as _tool
from tests.deploy_tools import run_tool as _run
from tests.deploy_tools import self_signed_certificate

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "deployment"
SDS_BIN = str(Path(sys.executable).parent / "sds")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = (DEPLOYMENT / "sds.service").read_text()
    for option in ("ProtectSystem=strict", "ReadWritePaths=/var/lib/sds", "NoNewPrivileges=yes"):
        assert option in unit
    assert "LoadCredential=jwt-secret:" in unit and "SDS_JWT_SECRET_FILE=%d/jwt-secret" in unit
    (tmp_path / "sds.service").write_text(unit.replace("/opt/sds/venv/bin/sds", SDS_BIN))
    result = _run([analyze, "verify", str(tmp_path / "sds.service")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sds.service" not in result.stderr, result.stderr


def test_nginx_site_config_passes_nginx_t(tmp_path: Path) -> None:
    site = (DEPLOYMENT / "nginx" / "sds.conf").read_text()
    assert "$request_uri" not in site.split("log_format", 1)[1].split(";", 1)[0]
    _assert_nginx_t_passes(site, tmp_path)
    for location in (
        "location /ws/",
        "location /signal/",
        "location /api/",
        "= /healthz",
        "= /metrics",
    ):
        assert location in site


def test_caddyfile_validates(tmp_path: Path) -> None:
    caddy = _tool("caddy")
    caddyfile = (DEPLOYMENT / "Caddyfile").read_text()
    assert "delete token" in caddyfile
    (tmp_path / "Caddyfile").write_text(caddyfile.replace("/var/log/caddy/", f"{tmp_path}/"))
    result = _run(
        [caddy, "validate", "--config", "Caddyfile", "--adapter", "caddyfile"],
        tmp_path,
        HOME=str(tmp_path),
        XDG_DATA_HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_sds_serve_as_a_user_with_a_healthcheck() -> None:
    lines = [
        line.strip()
        for line in (DEPLOYMENT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [line.split()[0] for line in lines if line.split()[0].isupper()]
    assert instructions[0] == "FROM"
    for needed in ("USER", "HEALTHCHECK", "CMD", "EXPOSE", "VOLUME"):
        assert needed in instructions
    assert any(line.startswith("CMD") and '"serve"' in line for line in lines)
    assert any("/healthz" in line for line in lines)
    for copied in ("pyproject.toml", "sds", "scripts"):
        assert (ROOT / copied).exists()


def test_compose_file_has_a_service_with_healthcheck_secret_and_volume() -> None:
    text = (DEPLOYMENT / "compose.yaml").read_text()
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        for key in ("services:", "  sds:", "    healthcheck:", "secrets:", "volumes:", "/healthz"):
            assert key in text
        assert "\t" not in text
        return
    data = yaml.safe_load(text)
    service = data["services"]["sds"]
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    assert service["ports"] == ["127.0.0.1:3000:3000"]
    assert service["environment"]["SDS_JWT_SECRET_FILE"].startswith("/run/secrets/")
    assert "sds_jwt_secret" in data["secrets"] and "sds-data" in data["volumes"]
    assert (DEPLOYMENT / service["build"]["dockerfile"].split("/")[-1]).exists()


def test_cron_file_runs_the_backup_script() -> None:
    cron = (DEPLOYMENT / "sds-backup.cron").read_text()
    assert "scripts/backup.sh" in cron and "--keep" in cron
    assert (ROOT / "scripts" / "backup.sh").exists()


def test_docker_secret_instructions_match_the_image_user() -> None:
    dockerfile = (DEPLOYMENT / "Dockerfile").read_text()
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile)
    gid = re.search(r"groupadd [^\n]*--gid (\d+)", dockerfile)
    assert uid and gid and f"--gid {gid.group(1)}" in dockerfile.split("useradd", 1)[1]
    owner = f"{uid.group(1)}:{gid.group(1)}"
    docs = (ROOT / "DEPLOYMENT.md").read_text()
    docker = docs[docs.index("## 3. Docker") : docs.index("## 4.")]
    compose = (DEPLOYMENT / "compose.yaml").read_text()
    for text in (docker, compose):
        assert f"chown {owner} deployment/jwt-secret" in text
        assert "chmod 0400 deployment/jwt-secret" in text
        assert "chmod 600" not in text and "chmod 0600" not in text
    assert f"uid {uid.group(1)}" in docker


def test_haproxy_config_passes_haproxy_c_and_routes_by_path_without_the_token(
    tmp_path: Path,
) -> None:
    haproxy = _tool("haproxy")
    cert, key = self_signed_certificate(tmp_path)
    pem = tmp_path / "sds.pem"
    pem.write_text(cert.read_text() + key.read_text())
    config = (DEPLOYMENT / "haproxy" / "sds.cfg").read_text()
    directives = [line.split("#", 1)[0].strip() for line in config.splitlines()]
    assert "balance uri path-only" in directives
    assert any(line.startswith("hash-type consistent") for line in directives)
    assert "option httpchk GET /healthz" in directives
    assert any(line.startswith("timeout tunnel") for line in directives)
    log_format = next(line for line in directives if line.startswith("log-format"))
    # %HP is the path alone; %r, %HU and %HQ would log the token of ?token=...
    assert "%HP" in log_format
    assert not re.search(r"%(\{[^}]*\})?(r|HU|HQ)(?![A-Za-z])", log_format), log_format
    config = config.replace("/etc/haproxy/certs/sds.example.com.pem", str(pem))
    config = config.replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
    (tmp_path / "haproxy.cfg").write_text(config)
    result = _run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout


def test_systemd_template_unit_verifies_with_the_port_as_instance(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = (DEPLOYMENT / "sds@.service").read_text()
    assert "Environment=SDS_PORT=%i" in unit
    assert "Environment=SDS_PERSIST_DIR=/var/lib/sds" in unit
    assert "LoadCredential=jwt-secret:" in unit and "SDS_JWT_SECRET_FILE=%d/jwt-secret" in unit
    # The same sandbox as the single-process unit.
    single = (DEPLOYMENT / "sds.service").read_text()
    sandbox = single[single.index("# Sandboxing") : single.index("[Install]")]
    assert sandbox in unit
    (tmp_path / "sds@.service").write_text(unit.replace("/opt/sds/venv/bin/sds", SDS_BIN))
    result = _run([analyze, "verify", str(tmp_path / "sds@3001.service")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sds@" not in result.stderr, result.stderr


def test_nginx_cluster_upstream_hashes_the_path_and_passes_nginx_t(tmp_path: Path) -> None:
    upstream = (DEPLOYMENT / "nginx" / "sds-cluster-upstream.conf").read_text()
    block = upstream[upstream.index("\nupstream sds_relay {") :]
    assert "hash $uri consistent;" in block and "$request_uri" not in block
    site = (DEPLOYMENT / "nginx" / "sds.conf").read_text()
    single = site[site.index("upstream sds_relay {") :]
    single = single[: single.index("}") + 1]
    site = site.replace(single, block.strip())
    assert "hash $uri consistent;" in site
    _assert_nginx_t_passes(site, tmp_path)


def _assert_nginx_t_passes(site: str, tmp_path: Path) -> None:
    """``nginx -t`` accepts ``site`` with a throwaway certificate and logs under tmp_path."""
    nginx = _tool("nginx")
    cert, key = self_signed_certificate(tmp_path)
    site = (
        site.replace("/etc/letsencrypt/live/sds.example.com/fullchain.pem", str(cert))
        .replace("/etc/letsencrypt/live/sds.example.com/privkey.pem", str(key))
        .replace("/var/log/nginx/", f"{tmp_path}/")
    )
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "tmp"
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {temp}; proxy_temp_path {temp};\n"
        f"  fastcgi_temp_path {temp}; uwsgi_temp_path {temp}; scgi_temp_path {temp};\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    result = _run([nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr
