"""The build: Makefile (Python check, venv rebuild, bench target), pyproject (declared imports,
pytest timeout), one constraints file that pyproject's ranges accept, and ``pip check``."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


# --- pyproject -------------------------------------------------------------------------------------

def test_pytest_has_a_default_timeout():
    timeout = PYPROJECT["tool"]["pytest"]["ini_options"].get("timeout")
    assert timeout and 0 < int(timeout) <= 900, "every test needs a deadline (pytest-timeout)"
    assert any(r.startswith("pytest-timeout") for r in PYPROJECT["project"]["optional-dependencies"]["dev"])


def test_every_third_party_import_in_the_package_is_declared():
    """Packages imported by steel/ and ray_jobs/ must be declared, not arrive through another one."""
    import_to_dist = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow",
                      "sklearn": "scikit-learn", "segmentation_models": "segmentation-models",
                      "tf_keras": "tf-keras"}
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    stdlib = set(sys.stdlib_module_names)
    local = {"steel", "ray_jobs"}
    # Packages that a declared one provides by design (Ray's extras, TensorFlow's Keras).
    provided = {"keras", "efficientnet", "image_classifiers", "starlette", "fastapi", "uvicorn",
                "pydantic", "requests", "aiohttp", "packaging", "psutil", "grpc", "google", "s3fs"}
    missing = {}
    for path in list((REPO / "steel").rglob("*.py")) + list((REPO / "ray_jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top in local or top in provided:
                    continue
                dist = canonicalize_name(import_to_dist.get(top, top))
                if dist not in declared:
                    missing.setdefault(dist, path.relative_to(REPO).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# --- constraints -----------------------------------------------------------------------------------

def test_constraints_pin_every_dependency_within_pyproject_ranges():
    pins = _constraints()
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}"


@pytest.mark.timeout(120)
def test_pip_check_passes_in_the_project_venv():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(120)
def test_venv_matches_the_constraints():
    """The venv the tests run in has the constrained versions (else the image would differ)."""
    from importlib import metadata

    pins = _constraints()
    wrong = {}
    for req in PYPROJECT["project"]["dependencies"]:
        name = canonicalize_name(Requirement(req).name)
        have = metadata.version(name)
        if have != pins[name]:
            wrong[name] = (have, pins[name])
    assert not wrong, f"venv vs constraints.txt: {wrong}; run `make constraints` after changing pins"


# --- Makefile --------------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in Python that reports version {version} and logs what it is asked to do.
echo "{version} $*" >> "$FAKE_LOG"
case "$1" in
  -c) echo {version} ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
esac
"""


def _fake_python(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.format(version=version))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _project(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def _make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FAKE_LOG=str(tmp_path / "log"))
    return subprocess.run(["make", "-s", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_with_wrong_python_says_so_in_one_line_then_recovers(tmp_path):
    proj = _project(tmp_path)
    wrong = _fake_python(tmp_path / "py" / "python3.12", "3.12")
    right = _fake_python(tmp_path / "py" / "python3.11", "3.11")

    out = _make(proj, "test", f"PYTHON={wrong}")
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, f"want one line, got: {out.stdout + out.stderr!r}"
    assert "Python 3.11" in lines[0] and "3.12" in lines[0] and "PYTHON=" in lines[0], lines[0]
    assert not (proj / ".venv").exists(), "nothing may be built with the wrong Python"

    # A venv left by another Python (an older Makefile, a manual `python3.12 -m venv .venv`) is rebuilt.
    _fake_python(proj / ".venv" / "bin" / "python", "3.12")
    out = _make(proj, "test", f"PYTHON={right}")
    assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "log").read_text()
    assert "3.11 -m venv .venv" in log
    assert "-m pip install -q -c constraints.txt -e .[dev]" in log
    assert "-m pytest" in log
    assert (proj / ".venv" / ".installed-stamp").read_text().strip() == "3.11"

    # Next run: up to date, straight to the tests.
    (tmp_path / "log").unlink()
    out = _make(proj, "test", f"PYTHON={right}")
    assert out.returncode == 0 and "-m venv" not in (tmp_path / "log").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_runs_the_bench_runner(tmp_path):
    out = subprocess.run(["make", "-n", "bench"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "-m bench.run_all" in out.stdout, out.stdout + out.stderr
    assert (REPO / "bench" / "run_all.py").is_file()


@pytest.mark.timeout(120)
def test_bench_runner_lists_and_runs_benchmarks():
    from bench import run_all

    assert {"rle", "metrics", "train", "score"} <= set(run_all.available())
    out = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "rle", "--", "--masks", "3",
                          "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "speed-up" in out.stdout and "bench_rle" in out.stdout and "ok" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "available" in bad.stderr
