"""mergekit's own test suite, run without and with our plugin: installing mergekit-lowrank must not turn it red.

Our methods live in mergekit's global registry, so mergekit's generic tests (e.g. every registered method through
``merge_state_dicts`` on strided 6×4 views) run them too. This test takes the sdist of the installed mergekit
version, copies its ``tests/`` (and its pytest configuration) into a temporary directory, adds the ``tests.common``
helpers the sdist lacks (``tests/mergekit_common.py``), and runs that suite twice in subprocesses of this Python:
once with the plugin's start-up finder removed before anything imports mergekit (stock mergekit, checked: none of
our methods registered), once with it (checked: ours registered). Both counts are printed; with the plugin there
must be no failure and no error, and nothing that passes without it may fail with it.

Getting the sdist needs the network, so this test is ``slow`` (not in the default run, nor in CI):
``MERGEKIT_SDIST`` may name a local ``mergekit-<version>.tar.gz`` or its unpacked directory; otherwise it runs
``pip download --no-binary :all: --no-deps mergekit==<version>`` and skips, saying why, if that fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOOK_DIR = HERE.parent / "mergekit_hook"

# Runs in the suite's directory: argv[1] is "on" or "off", the rest goes to pytest. The .pth hook has already
# run (site), but only put a finder on sys.meta_path; removing it before mergekit is imported leaves stock mergekit.
RUNNER = r"""
import sys
hook = sys.modules.get("_lowrank_methods_hook")
if sys.argv[1] == "off":
    if hook is not None:
        hook._Finder.pending.clear()
        while hook._Finder in sys.meta_path:
            sys.meta_path.remove(hook._Finder)
elif hook is None:  # the plugin is importable but its .pth is not installed: install the hook by hand
    sys.path.insert(0, sys.argv[2])
    import _lowrank_methods_hook
    _lowrank_methods_hook.install()
import pytest
code = pytest.main(sys.argv[3:])
import mergekit.merge_methods as mm
print("@@plugin-active=%s" % any(m.spec.name == "ctm" for m in mm.registered_methods()))
sys.exit(int(code))
"""


def _sdist(tmp: Path, version: str) -> Path:
    """The unpacked sdist directory (with its tests/), from MERGEKIT_SDIST or pip download; skips if neither works."""
    given = os.environ.get("MERGEKIT_SDIST")
    if given:
        archive = Path(given)
        if archive.is_dir():
            return archive
    else:
        dl = tmp / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", f"mergekit=={version}", "-d", str(dl)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"could not download the mergekit {version} sdist (set MERGEKIT_SDIST to a local copy): {e}")
        found = sorted(dl.glob("mergekit-*.tar.gz")) if done.returncode == 0 else []
        if not found:
            last = (done.stderr.strip().splitlines() or ["no sdist in the download"])[-1]
            pytest.skip(f"could not download the mergekit {version} sdist (set MERGEKIT_SDIST to a local copy): {last}")
        archive = found[0]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    (root,) = [p for p in (tmp / "sdist").iterdir() if p.is_dir()]
    return root


def _suite(tmp: Path, sdist: Path) -> Path:
    """tests/ and the pytest configuration of the sdist, plus our tests/common.py (not its mergekit/ sources:
    the installed mergekit is the one under test)."""
    if not (sdist / "tests").is_dir():
        pytest.skip(f"{sdist} has no tests/ directory")
    suite = tmp / "suite"
    shutil.copytree(sdist / "tests", suite / "tests")
    shutil.copy(sdist / "pyproject.toml", suite / "pyproject.toml")
    shutil.copy(HERE / "mergekit_common.py", suite / "tests" / "common.py")
    return suite


def _run(suite: Path, plugin: bool, tmp: Path) -> dict:
    report = tmp / f"junit-{'on' if plugin else 'off'}.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", RUNNER, "on" if plugin else "off", str(HOOK_DIR), "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", f"--basetemp={tmp / ('base-on' if plugin else 'base-off')}"]
    done = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=3600)
    outcomes = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    active = "@@plugin-active=True" in done.stdout
    return {"outcomes": outcomes, "counts": Counter(outcomes.values()), "active": active,
            "tail": (done.stdout + done.stderr)[-4000:], "rc": done.returncode}


def _line(label: str, run: dict) -> str:
    c = run["counts"]
    return (f"{label}: {c['passed']} passed, {c['skipped']} skipped, {c['failure']} failed, {c['error']} errors "
            f"(plugin active: {run['active']})")


@pytest.mark.slow
def test_mergekit_own_suite_is_as_green_with_the_plugin(tmp_path, capsys):
    pytest.importorskip("mergekit")
    pytest.importorskip("transformers")
    version = metadata.version("mergekit")
    suite = _suite(tmp_path, _sdist(tmp_path, version))
    without = _run(suite, False, tmp_path)
    with_plugin = _run(suite, True, tmp_path)
    summary = (f"mergekit {version} own suite:\n  {_line('without plugin', without)}\n"
               f"  {_line('with plugin', with_plugin)}")
    with capsys.disabled():  # the figures belong in the output whatever the outcome
        print(f"\n{summary}")
    assert without["outcomes"] and with_plugin["outcomes"], f"no test report\n{without['tail']}\n{with_plugin['tail']}"
    assert not without["active"], "the plugin was active in the run meant to be without it"
    assert with_plugin["active"], "the plugin was not active in the run meant to be with it"
    broken = sorted(t for t, o in with_plugin["outcomes"].items()
                    if o in ("failure", "error") and without["outcomes"].get(t) == "passed")
    bad = sorted(t for t, o in with_plugin["outcomes"].items() if o in ("failure", "error"))
    assert not broken, f"{summary}\npassing without the plugin, failing with it: {broken[:20]}\n{with_plugin['tail']}"
    assert not bad, f"{summary}\nfailing with the plugin: {bad[:20]}\n{with_plugin['tail']}"
