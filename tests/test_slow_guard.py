"""The check behind the test tiers (tests/slow_guard.py), run on a small test file of its own through pytester."""

from __future__ import annotations

import pytest

CASES = """
import subprocess
import sys

import pytest


def test_unmarked_python_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_marked_python_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_unmarked_compile():
    import torch

    torch.compile(lambda x: x + 1)


def test_unmarked_other_subprocess():
    subprocess.run(["true"], check=True)


def test_unmarked_plain():
    assert 1 + 1 == 2
"""

# the inner session: the guard as the suite loads it; its own markers are not registered there
INNER = ("-p", "tests.slow_guard", "-p", "no:cacheprovider", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning")


@pytest.mark.slow  # pytester runs the inner session in a Python subprocess
def test_unmarked_slow_work_fails_and_marked_or_cheap_work_passes(pytester: pytest.Pytester):
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess(*INNER)
    result.assert_outcomes(passed=5, errors=2)  # a failed check is an error in the test's teardown
    out = result.stdout.str()
    assert "test_unmarked_python_subprocess is not marked slow but started the subprocess" in out
    assert "test_unmarked_compile is not marked slow but started torch.compile" in out
    assert "test_marked_python_subprocess" not in out.split("short test summary")[-1]


@pytest.mark.slow
def test_a_slow_fixture_needs_the_mark(pytester: pytest.Pytester):
    pytester.makeconftest(
        """
import pytest

@pytest.fixture
def ray_cluster():
    yield
"""
    )
    pytester.makepyfile(
        test_fixture="""
import pytest

def test_unmarked(ray_cluster):
    pass

@pytest.mark.slow
def test_marked(ray_cluster):
    pass
"""
    )
    result = pytester.runpytest_subprocess(*INNER)
    result.assert_outcomes(passed=1, errors=1)
    assert "uses ['ray_cluster'] but is not marked slow" in result.stdout.str()
