""".ci/run itself: installs what the tests need, runs the README's test command, fails loudly.

The script runs from a copy of the repository skeleton with stand-ins for the
system programs it calls (dpkg-query, apt-get, id, python3 and the venv's tools)
placed first on PATH; each stand-in records its arguments, so a test sees what
the script ran and in which order, and decides what each program answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_RUN = ROOT / ".ci" / "run"
PACKAGES = ("nginx-light", "caddy", "systemd", "openssl", "haproxy", "postgresql-15")

RECORDER = """#!/bin/sh
echo "NAME $*" >> "$CALLS"
exit "${EXIT_VAR:-0}"
"""

PYTHON3 = """#!/bin/sh
echo "python3 $*" >> "$CALLS"
if [ "$1 $2 $3" = "-m venv .venv" ]; then
  mkdir -p .venv/bin
  for tool in pip python ruff mypy; do
    printf '#!/bin/sh\\necho "%s $*" >> "$CALLS"\\n' "$tool" > ".venv/bin/$tool"
    chmod 755 ".venv/bin/$tool"
  done
  printf '#!/bin/sh\\necho "python $*" >> "$CALLS"\\nexit "${PYTEST_EXIT:-0}"\\n' > .venv/bin/python
fi
"""

DPKG_QUERY = """#!/bin/sh
case " $INSTALLED " in
  *" $3 "*) printf 'install ok installed' ;;
  *) exit 1 ;;
esac
"""


def readme_test_command() -> str:
    """The test command of the README's quick start (the part after the last `&&`)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    line = next(line for line in text[start:].splitlines() if "pytest" in line)
    return line.split("&&")[-1].strip()


def run_ci(
    tmp_path: Path,
    *,
    installed: tuple[str, ...] = PACKAGES,
    uid: int = 0,
    apt_exit: int = 0,
    pytest_exit: int = 0,
    ci: bool = True,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run a copy of .ci/run with stand-ins; (result, the calls it made in order)."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(CI_RUN, repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "python3": PYTHON3,
        "dpkg-query": DPKG_QUERY,
        "apt-get": RECORDER.replace("NAME", "apt-get").replace("EXIT_VAR", "APT_EXIT"),
        "id": f"#!/bin/sh\necho {uid}\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "INSTALLED": " ".join(installed),
        "APT_EXIT": str(apt_exit),
        "PYTEST_EXIT": str(pytest_exit),
        "HOME": str(tmp_path),
    }
    if ci:
        env["CI"] = "true"
    result = subprocess.run(
        ["bash", str(repo / ".ci" / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return result, [call.rstrip() for call in calls.read_text().splitlines()]


def test_ci_runs_the_readme_test_command_then_lint_format_and_types(tmp_path: Path) -> None:
    result, calls = run_ci(tmp_path)
    assert result.returncode == 0, result.stderr
    command = readme_test_command()
    assert command == ".venv/bin/python -m pytest -n 2"
    assert calls == [
        "python3 -m venv .venv",
        "pip install -e .[test]",
        "python " + command.split(" ", 1)[1],
        "ruff check .",
        "ruff format --check .",
        "mypy",
    ]


def test_ci_with_every_package_installed_does_not_touch_apt(tmp_path: Path) -> None:
    result, calls = run_ci(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not [call for call in calls if call.startswith("apt-get")]


@pytest.mark.parametrize("exit_code", [5, 1, 2])
def test_ci_fails_when_pytest_fails_or_collects_nothing(tmp_path: Path, exit_code: int) -> None:
    result, calls = run_ci(tmp_path, pytest_exit=exit_code)
    assert result.returncode != 0
    assert "ruff check ." not in calls
    if exit_code == 5:
        assert "no tests" in result.stderr


def test_ci_installs_only_the_missing_packages(tmp_path: Path) -> None:
    if not Path("/usr/sbin/policy-rc.d").exists():
        pytest.skip("this case would write /usr/sbin/policy-rc.d on the machine")
    result, calls = run_ci(tmp_path, installed=("systemd", "openssl"))
    assert result.returncode == 0, result.stderr
    installs = [call for call in calls if call.startswith("apt-get") and "install" in call]
    assert len(installs) == 1
    for package in PACKAGES:
        assert (package in installs[0].split()) == (package not in ("systemd", "openssl"))


def test_ci_fails_when_a_package_cannot_be_installed(tmp_path: Path) -> None:
    if not Path("/usr/sbin/policy-rc.d").exists():
        pytest.skip("this case would write /usr/sbin/policy-rc.d on the machine")
    result, calls = run_ci(tmp_path, installed=("systemd",), apt_exit=100)
    assert result.returncode != 0
    assert "installing" in result.stderr and "caddy" in result.stderr
    assert not [call for call in calls if call.startswith("python")]


def test_ci_without_root_fails_under_ci_and_only_warns_locally(tmp_path: Path) -> None:
    result, calls = run_ci(tmp_path / "ci", installed=(), uid=1000)
    assert result.returncode != 0
    assert "needs apt-get as root" in result.stderr
    assert not [call for call in calls if call.startswith("python")]
    result, calls = run_ci(tmp_path / "local", installed=(), uid=1000, ci=False)
    assert result.returncode == 0, result.stderr
    assert "will be skipped" in result.stderr
    assert "mypy" in calls


def test_ci_script_is_executable_bash_without_silenced_installs() -> None:
    assert os.access(CI_RUN, os.X_OK)
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert "|| echo" not in text
