"""Adding a method is one new file: a toy method written into ``core/methods/`` of a copy of the package shows up
in ``mergekit-lowrank methods``, in mergekit's registry, in the model card with its citation, and in the
cross-method invariant tests, with no other file edited."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_adapter, write_recipe

ROOT = Path(__file__).resolve().parents[1]
TOY = '''"""toy_mean: the weighted mean of the updates, kept exact by concatenation (a test's method)."""

from lowrank_methods.core.linalg import stack_factors
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import ScaledParams
from lowrank_methods.core.rules import over_present_tasks
from lowrank_methods.core.types import LoraFactors, ModuleResult


@method("toy_mean", pretty_name="Toy mean", paper=Paper("doe2026toy", "A Toy Merge", "Doe, Jane", 2026,
                                                         "https://arxiv.org/abs/2601.00001"))
@over_present_tasks  # T counts the adapters that have the module (without it, the invariant tests fail: see below)
def toy_mean(factors, weights, params: ScaledParams, ctx) -> ModuleResult:
    """λ Σ_t w_t ΔW_t / T, exactly (rank Σ r_t)."""
    B, A = stack_factors(factors, [params.lambda_ * w / len(factors) for w in weights])
    return ModuleResult(LoraFactors(A, B), {"rank": A.shape[0], "retained_energy": 1.0})
'''


@pytest.fixture(scope="module")
def package_with_toy(tmp_path_factory) -> Path:
    """A copy of the package with one new file, ``core/methods/toy_mean.py``; the real package is untouched."""
    where = tmp_path_factory.mktemp("toy")
    shutil.copytree(ROOT / "lowrank_methods", where / "lowrank_methods", ignore=shutil.ignore_patterns("__pycache__"))
    (where / "lowrank_methods" / "core" / "methods" / "toy_mean.py").write_text(TOY)
    return where


def python(where: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python args…`` run in ``where``, so that the copy is the ``lowrank_methods`` it imports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, *args], cwd=where, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_the_copy_is_what_runs(package_with_toy):
    out = python(package_with_toy, "-c", "import lowrank_methods; print(lowrank_methods.__file__)").stdout
    assert Path(out.strip()).is_relative_to(package_with_toy)


def test_it_is_listed_by_methods(package_with_toy):
    out = python(package_with_toy, "-c", "from lowrank_methods.cli import main; main(['methods'])").stdout
    assert "toy_mean" in out and "λ Σ_t w_t ΔW_t / T" in out


def test_it_is_in_mergekits_registry(package_with_toy):
    probe = ("import mergekit.merge_methods as mm; m = mm.get('toy_mean'); "
             "print(m.spec.pretty_name, m.spec.reference_url, [p.name for p in m.spec.parameters])")
    out = python(package_with_toy, "-c", probe).stdout
    assert "Toy mean https://arxiv.org/abs/2601.00001" in out and "'lambda'" in out


def test_its_card_cites_it(package_with_toy, tmp_path):
    a = write_adapter(tmp_path / "a", {"model.layers.0.q": (6, 5)}, seed=1)
    b = write_adapter(tmp_path / "b", {"model.layers.0.q": (6, 5)}, seed=2)
    recipe = write_recipe(tmp_path / "toy.yml", "toy_mean", [(a, None), (b, None)], {"lambda": 0.5})
    python(package_with_toy, "-c", f"from lowrank_methods.cli import main; main(['merge', {str(recipe)!r}, "
                                   f"{str(tmp_path / 'out')!r}, '-q'])")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "A Toy Merge" in card and "@misc{doe2026toy," in card and "https://arxiv.org/abs/2601.00001" in card


def test_it_is_in_the_cross_method_invariant_tests(package_with_toy):
    done = python(package_with_toy, "-m", "pytest", str(ROOT / "tests" / "test_methods_common.py"), "-q",
                  "-k", "toy_mean", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider")
    assert "2 passed" in done.stdout  # an absent adapter changes nothing; determinism (its gpu test: deselected)


def test_the_invariant_tests_catch_a_toy_that_counts_absent_adapters(package_with_toy, tmp_path):
    """The same toy without ``@over_present_tasks`` divides by every adapter, present or not: a test fails."""
    broken = shutil.copytree(package_with_toy / "lowrank_methods", tmp_path / "lowrank_methods")
    toy = broken / "core" / "methods" / "toy_mean.py"
    toy.write_text(toy.read_text().replace("@over_present_tasks", ""))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_methods_common.py"), "-q", "-k",
                           "toy_mean", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "test_an_absent_adapter_changes_nothing[toy_mean-]" in done.stdout
