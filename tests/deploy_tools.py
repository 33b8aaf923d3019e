"""External programs the deployment tests run (caddy, nginx, openssl, systemd-analyze).

Locally a missing program skips its test; in CI (CI=true) it fails it, since
.ci/run installs every one of them and a skip there would hide a broken config.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The path of an installed program; skip (locally) or fail (CI=true) without it."""
    path = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if Path(f"{d}/{name}").exists()), None
    )
    if path is None:
        message = f"{name} is not installed (apt-get install {name}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a program to completion with a minimal environment, output captured."""
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **env},
    )


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for CN=127.0.0.1 (made by openssl)."""
    openssl = require_tool("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = run_tool(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        directory,
    )
    assert result.returncode == 0, result.stderr
    return cert, key


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 15.0
) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail with the program's log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"127.0.0.1:{port} not listening after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a program started by a test, bounded."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def substitute(text: str, old: str, new: str) -> str:
    """``text`` with the one occurrence of ``old`` replaced; fails if it is not there exactly once.

    The tests derive their configs from the shipped files this way, so a change
    to the shipped file that the substitution no longer matches fails loudly
    instead of leaving a test that checks something else.
    """
    count = text.count(old)
    assert count == 1, f"expected {old!r} once in the shipped config, found it {count} times"
    return text.replace(old, new)
