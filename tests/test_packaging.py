"""The wheel and the sdist carry the licence, the operator docs and the deployment files."""

from __future__ import annotations

import email
import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 600
SHIPPED_DOCS = ("LICENSE", "DEPLOYMENT.md")


def _deployment_files() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "deployment").rglob("*") if path.is_file()
    )


def _build(out: Path) -> tuple[Path, Path | None]:
    """The wheel and (with the `build` package) the sdist of the project."""
    if importlib.util.find_spec("build") is not None:
        command = [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)]
    else:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    sdists = list(out.glob("*.tar.gz"))
    return wheel, sdists[0] if sdists else None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path | None]:
    return _build(tmp_path_factory.mktemp("dist"))


def test_the_wheel_installs_the_licence_docs_and_deployment_files(
    built: tuple[Path, Path | None],
) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
    shared = {
        n.split("/data/share/sds-relay/", 1)[1] for n in names if "/data/share/sds-relay/" in n
    }
    for name in (*SHIPPED_DOCS, *_deployment_files()):
        assert name in shared, f"{name} is not in the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("Project-URL")


def test_the_sdist_carries_the_licence_docs_and_deployment_files(
    built: tuple[Path, Path | None],
) -> None:
    _, sdist = built
    if sdist is None:
        pytest.skip("the `build` package is not installed: no sdist was built")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in (*SHIPPED_DOCS, *_deployment_files()):
        assert name in names, f"{name} is not in the sdist"


def test_the_licence_is_mit_of_the_sds_authors() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the sds authors" in text
