"""The container image, checked without a Docker engine: the Dockerfile lints clean, its
command is `python -m <module>`, and the wheel it installs holds every service, its migrations
and the generated code."""

import fnmatch
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from services.runtime.migrations import migration_files
from tests.kubernetes_manifests import DEPLOY, REPO, service_definitions

DOCKERFILE = DEPLOY / "docker/Dockerfile"
HADOLINT = str(Path(sys.executable).parent / "hadolint")


def test_the_dockerfile_lints_clean():
    linted = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_runs_python_modules_as_a_non_root_user():
    final_stage = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    instructions = dict(
        line.split(" ", 1) for line in final_stage.splitlines() if line[:1].isupper()
    )
    assert json.loads(instructions["ENTRYPOINT"]) == ["python", "-m"]
    assert json.loads(instructions["CMD"]) == ["services.jobs"]
    assert instructions["USER"].split(":")[0].isdigit()


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The files of the wheel the image installs, built the way its Dockerfile builds it."""
    folder = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip_wheel, "--no-build-isolation", "--wheel-dir", str(folder), str(REPO)], check=True
    )
    (wheel,) = folder.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize("service", service_definitions(), ids=lambda definition: definition.name)
def test_the_wheel_holds_the_service_its_migrations_and_its_generated_code(service, wheel_files):
    assert f"services/{service.name}/__main__.py" in wheel_files
    for _, path in migration_files(service.migrations):
        assert path.relative_to(REPO).as_posix() in wheel_files
    package = service.grpc_service.rsplit(".", 1)[0].replace(".", "/")
    assert any(name.startswith(package) and name.endswith("_pb2_grpc.py") for name in wheel_files)


def test_the_image_build_copies_every_package_the_wheel_installs():
    """The Dockerfile builds its wheel from what it copies: a package left out is missing from
    the image, not from a wheel built here (the Publisher imports suite_client)."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = [
        path.parent.name
        for path in REPO.glob("*/__init__.py")
        if any(fnmatch.fnmatch(path.parent.name, pattern) for pattern in include)
    ]
    copied = {
        line.split()[1].rstrip("/")
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert packages
    assert set(packages) <= copied
