"""The distribution: the package list names every package of the tree, and a wheel built from the repo carries
the presets and the dashboard's page, so an installed `moeforge` finds `--config tiny` from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_package_of_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        p
        for p in find_namespace_packages(str(ROOT), include=["pipeline*", "actors*", "jobs*"])
        if "__pycache__" not in p
    }
    assert found | {"pipeline.presets"} == listed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_installed_wheel_finds_its_presets_from_any_directory(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    [wheel] = (tmp_path / "dist").glob("moeforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    presets = {Path(n).name for n in names if n.startswith("pipeline/presets/")}
    assert presets == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert "pipeline/dashboard/static/index.html" in names
    # a fresh venv with the wheel installed; its dependencies are reached through this venv's site-packages (a
    # path entry only: this venv's editable finder for the checkout is not loaded there)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the suite puts the checkout on it
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=240,
        env=clean,
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # after: pip would see the editable one
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [str(python), "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's code, not the checkout
    for preset in ("tiny", "cpu-quality"):
        shown = subprocess.run(
            [str(venv / "bin" / "moeforge"), "config", "show", "--config", preset],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"name: {preset}" in shown.stdout
