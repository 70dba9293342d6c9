"""`mergekit-lowrank reconstruct` never trusts a bundle: every hostile variant of a real bundle is refused with one
line on stderr, exit code != 0, no traceback, and nothing left beside OUT (neither OUT nor a staging directory)."""

import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from helpers import dense_delta, merged_delta, write_adapter, write_recipe
from lowrank_methods.formats.bundle import ReversibleBundle, summary_table
from lowrank_methods.cli import main
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.core.errors import MAX_MESSAGE, BundleError
from lowrank_methods.pipeline.recipe import load_recipe

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
HEAD = "base_model.model.score.weight"  # a modules_to_save tensor that task "a" carries


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only spin


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real rmm bundle of three tasks (a carries a modules_to_save tensor; b lacks V), and its inputs."""
    root = tmp_path_factory.mktemp("hostile")
    adapters = [
        write_adapter(root / "a", {Q: (24, 16), V: (8, 16)}, r=4, seed=1, extra_tensors={HEAD: torch.ones(2, 16)},
                      extra_config={"modules_to_save": ["score"]}),
        write_adapter(root / "b", {Q: (24, 16)}, r=3, seed=2),
        write_adapter(root / "c", {Q: (24, 16), V: (8, 16)}, r=2, seed=3),
    ]
    recipe = write_recipe(root / "r.yml", "rmm", [(p, None) for p in adapters], {"p": 2})
    run_merge(load_recipe(recipe), root / "bundle", quiet=True, write_card=False)
    return root / "bundle", adapters


@pytest.fixture
def bundle(built, tmp_path):
    """A fresh copy of the bundle in its own directory (``case/``), where OUT goes too."""
    (tmp_path / "case").mkdir()
    return shutil.copytree(built[0], tmp_path / "case" / "bundle")


def reconstruct(bundle, task, out, *extra):
    return CliRunner().invoke(main, ["reconstruct", str(bundle), task, str(out), *extra])


# -- damage helpers --------------------------------------------------------------------------------------------------

def _manifest(d):
    return json.loads((d / "reversible.json").read_text())


def edit(change):
    """Change the parsed manifest in place (``change`` may also return a replacement) and write it back."""
    def damage(d):
        m = _manifest(d)
        replaced = change(m)
        (d / "reversible.json").write_text(json.dumps(m if replaced is None else replaced))
    return damage


def module(name, **fields):
    return edit(lambda m: m["modules"][name].update(fields))


def layout(name, **fields):
    return edit(lambda m: m["modules"][name]["layout"].update(fields))


def task(i, **fields):
    return edit(lambda m: m["tasks"][i].update(fields))


def drop(*path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]
    return edit(change)


def raw(data: bytes):
    return lambda d: (d / "reversible.json").write_bytes(data)


def raw_replace(old: str, new: str):
    """Edit the manifest's text: for values json.dumps would not write (NaN, Infinity)."""
    def damage(d):
        text = json.dumps(_manifest(d))
        assert old in text
        (d / "reversible.json").write_text(text.replace(old, new, 1))
    return damage


def retensor(change, manifest_change=None):
    """Rewrite bundle.safetensors and record its new checksum, so that only the tensors themselves are hostile."""
    def damage(d):
        tensors = dict(load_file(str(d / "bundle.safetensors")))
        change(tensors)
        save_file(tensors, str(d / "bundle.safetensors"))
        data = (d / "bundle.safetensors").read_bytes()
        m = _manifest(d)
        m["sha256"] = hashlib.sha256(data).hexdigest()
        if manifest_change:
            manifest_change(m)
        (d / "reversible.json").write_text(json.dumps(m))
    return damage


def raw_tensors(data: bytes):
    def damage(d):
        (d / "bundle.safetensors").write_bytes(data)
        edit(lambda m: m.update(sha256=hashlib.sha256(data).hexdigest()))(d)
    return damage


def _poison(key, value):
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value
    return change


def _flip(d):
    raw_bytes = (d / "bundle.safetensors").read_bytes()
    (d / "bundle.safetensors").write_bytes(raw_bytes[:-3] + bytes([raw_bytes[-3] ^ 0xFF]) + raw_bytes[-2:])


def _overflow(t):
    """Finite tensors whose product is not: basis 1e20 · coeffs 1e20 overflows float32 when rebuilt."""
    t[f"{Q}.basis_B"] = torch.full_like(t[f"{Q}.basis_B"], 1e20)
    t[f"{Q}.coeffs_B"] = torch.full_like(t[f"{Q}.coeffs_B"], 1e20)


def _deep(n):
    v = []
    for _ in range(n):
        v = [v]
    return v


def _rename_module(new):
    def change(m):
        m["modules"][new] = m["modules"].pop(Q)
    return edit(change)


def _collide(t):
    t[f"extra.base_model.model.{Q}.lora_A.weight"] = torch.zeros(3, 16)


def _zero_ranks_of_b(m):
    for info in m["modules"].values():
        info["ranks"][1] = 0


LONG = "x" * 10_000

# (id, damage, task, what the one line must say)
HOSTILE = [
    # dtype: an allow-list, never getattr(torch, ...)
    ("dtype-dunder-class", edit(lambda m: m.update(dtype="__class__")), "a", "dtype"),
    ("dtype-Tensor", edit(lambda m: m.update(dtype="Tensor")), "a", "dtype"),
    ("dtype-int", edit(lambda m: m.update(dtype=5)), "a", "dtype"),
    ("dtype-int8", edit(lambda m: m.update(dtype="int8")), "a", "dtype"),
    ("dtype-list", edit(lambda m: m.update(dtype=["float32"])), "a", "dtype"),
    ("dtype-lies", edit(lambda m: m.update(dtype="float16")), "a", "is float32 but reversible.json says float16"),
    # per-module fields of the wrong type or range
    ("ranks-string", module(Q, ranks="4,3,2"), "a", "ranks"),
    ("ranks-string-entry", module(Q, ranks=["4", 3, 2]), "a", "ranks[0]"),
    ("ranks-negative", module(Q, ranks=[-1, 3, 2]), "a", "ranks[0]"),
    ("ranks-float", module(Q, ranks=[4.0, 3, 2]), "a", "ranks[0]"),
    ("ranks-too-few", module(Q, ranks=[4, 3]), "a", "ranks has 2 entries for 3 tasks"),
    ("ranks-above-r", module(Q, ranks=[9, 3, 2]), "a", "larger than r"),
    ("ranks-null", module(Q, ranks=None), "a", "ranks"),
    ("p-string", module(Q, p="2"), "a", ".p"),
    ("p-negative", module(Q, p=-1), "a", ".p"),
    ("p-wrong", module(Q, p=1), "a", "tensor basis_B is shape"),
    ("r-bool", module(Q, r=True), "a", ".r"),
    ("r-float", module(Q, r=4.0), "a", ".r"),
    ("center-string", module(Q, center="yes"), "a", ".center"),
    ("errors-too-few", module(Q, errors=[0.0]), "a", "errors has 1 entries"),
    ("errors-infinity", raw_replace('"errors": [', '"errors": [Infinity, '), "a", ".errors[0]"),
    ("norms-nan", raw_replace('"norms": [', '"norms": [NaN, '), "a", ".norms[0]"),
    ("stored-negative", module(Q, stored_numbers=-5), "a", "stored_numbers"),
    ("layout-string", module(Q, layout="linear"), "a", ".layout"),
    ("layout-list", module(Q, layout=[24, 16]), "a", ".layout"),
    ("layout-kind", layout(Q, kind="mystery"), "a", "layout.kind"),
    ("layout-kind-int", layout(Q, kind=1), "a", "layout.kind"),
    ("shape-negative", layout(Q, shape=[-24, 16]), "a", "shape[0]"),
    ("shape-zero", layout(Q, shape=[24, 0]), "a", "shape[1]"),
    ("shape-huge", layout(Q, shape=[10**30, 16]), "a", "tensor basis_B is shape"),
    ("shape-one-dim", layout(Q, shape=[24]), "a", "shape"),
    ("shape-three-dims", layout(Q, shape=[24, 16, 1]), "a", "shape"),
    ("shape-strings", layout(Q, shape=["24", "16"]), "a", "shape[0]"),
    ("shape-scalar", layout(Q, shape=24), "a", "shape"),
    ("shape-transposed", layout(Q, shape=[16, 24]), "a", "tensor basis_B is shape"),
    ("fan-in-fan-out-string", layout(Q, fan_in_fan_out="yes"), "a", "fan_in_fan_out"),
    ("kernel-on-linear", layout(Q, kernel=[3]), "a", "kernel"),
    ("kernel-zero", layout(Q, kind="conv", kernel=[0]), "a", "kernel[0]"),
    ("conv-without-kernel", layout(Q, kind="conv", kernel=[]), "a", "needs its kernel"),
    ("conv-kernel-not-dividing", layout(Q, kind="conv", kernel=[5]), "a", "not a multiple of the kernel"),
    ("conv-kernel-too-long", layout(Q, kind="conv", kernel=[1] * 70), "a", "kernel"),
    # missing keys
    ("missing-center", drop("modules", Q, "center"), "a", "center: Field required"),
    ("missing-layout", drop("modules", Q, "layout"), "a", "layout: Field required"),
    ("missing-ranks", drop("modules", Q, "ranks"), "a", "ranks: Field required"),
    ("missing-tasks", drop("tasks"), "a", "tasks: Field required"),
    ("missing-modules", drop("modules"), "a", "modules: Field required"),
    ("missing-sha256", drop("sha256"), "a", "sha256: Field required"),
    ("missing-dtype", drop("dtype"), "a", "dtype: Field required"),
    ("missing-storage", drop("storage"), "a", "storage: Field required"),
    ("missing-task-config", drop("tasks", 0, "config"), "a", "tasks[0].config"),
    ("missing-task-error", drop("tasks", 0, "error"), "a", "tasks[0].error"),  # once crashed after writing OUT
    # tasks
    ("task-unknown", lambda d: None, "nope", "has no task 'nope'"),
    ("task-duplicate-names", task(1, name="a"), "a", "not unique"),
    ("task-name-int", task(1, name=5), "a", "tasks[1].name"),
    ("task-name-empty", task(1, name=""), "a", "tasks[1].name"),
    ("task-error-string", task(0, error="0.1"), "a", "tasks[0].error"),  # once crashed after writing OUT
    ("task-error-nan", raw_replace('"error": ', '"error": NaN, "was": '), "a", "tasks[0].error"),
    ("task-config-list", task(0, config=["r", 4]), "a", "tasks[0].config"),
    ("task-config-deep", task(0, config={"peft_type": "LORA", "x": _deep(200)}), "a", "nested deeper"),
    ("task-config-base-list", task(0, config={"base_model_name_or_path": ["org/x"]}), "a", "base_model_name_or_path"),
    ("task-extra-keys-string", task(0, extra_keys=HEAD), "a", "tasks[0].extra_keys"),
    ("task-extra-keys-twice", task(0, extra_keys=[HEAD, HEAD]), "a", "twice"),
    ("task-extra-missing", retensor(lambda t: t.pop(f"extra.{HEAD}")), "a", "lacks 'extra."),
    ("task-extra-collides", retensor(_collide, lambda m: m["tasks"][1].update(
        extra_keys=[f"base_model.model.{Q}.lora_A.weight"])), "b", "collides"),
    ("task-all-ranks-zero", edit(_zero_ranks_of_b), "b", "rank 0 in every module"),
    ("tasks-dict", edit(lambda m: m.update(tasks={"a": {}})), "a", "tasks"),
    ("tasks-empty", edit(lambda m: m.update(tasks=[])), "a", "tasks"),
    ("modules-list", edit(lambda m: m.update(modules=[Q])), "a", "modules"),
    ("modules-empty", edit(lambda m: m.update(modules={})), "a", "modules"),
    ("module-name-long", _rename_module(LONG), "a", "tensor basis_B is missing"),
    ("module-name-newline", _rename_module("q\nproj\r\x1b[31m"), "a", "tensor basis_B is missing"),
    ("storage-ratio-string", edit(lambda m: m["storage"].update(ratio="big")), "a", "storage.ratio"),
    ("top-p-string", edit(lambda m: m.update(p="2")), "a", "p"),
    ("parameters-deep", edit(lambda m: m.update(parameters={"x": _deep(200)})), "a", "nested deeper"),
    # the file as a whole
    ("not-utf8", raw(b'{"format": "\xff\xfe"}'), "a", "not UTF-8"),
    ("json-list", raw(b"[1, 2, 3]"), "a", "is not a mergekit-lowrank/reversible-bundle manifest"),
    ("json-number", raw(b"5"), "a", "is not a mergekit-lowrank/reversible-bundle manifest"),
    ("json-null", raw(b"null"), "a", "is not a mergekit-lowrank/reversible-bundle manifest"),
    ("json-truncated", raw(b'{"format": "mergekit-lowrank/rev'), "a", "is not valid JSON"),
    ("json-nested-too-deep", raw(b"[" * 100_000), "a", "not valid JSON"),
    ("json-empty", raw(b""), "a", "not valid JSON"),
    ("format-wrong", edit(lambda m: m.update(format="something/else")), "a", "manifest"),
    ("version-2", edit(lambda m: m.update(version=2)), "a", "format version 2"),
    ("version-true", edit(lambda m: m.update(version=True)), "a", "format version True"),
    ("version-huge-string", edit(lambda m: m.update(version=LONG)), "a", "format version"),
    ("manifest-is-a-directory", lambda d: ((d / "reversible.json").unlink(), (d / "reversible.json").mkdir()), "a",
     "has no reversible.json"),
    # the tensors and their checksum
    ("sha-mismatch", _flip, "a", "does not match the checksum"),
    ("sha-not-hex", edit(lambda m: m.update(sha256="zz" * 32)), "a", "sha256"),
    ("sha-short", edit(lambda m: m.update(sha256="abc")), "a", "sha256"),
    ("sha-int", edit(lambda m: m.update(sha256=5)), "a", "sha256"),
    ("tensors-missing-file", lambda d: (d / "bundle.safetensors").unlink(), "a", "has no bundle.safetensors"),
    ("tensors-garbage", raw_tensors(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..."), "a", "cannot read"),
    ("tensors-empty", raw_tensors(b""), "a", "cannot read"),
    ("tensor-nan", retensor(_poison(f"{Q}.basis_B", float("nan"))), "a", "tensor basis_B holds NaN or Inf"),
    ("tensor-inf", retensor(_poison(f"{V}.mean_A", float("inf"))), "c", "tensor mean_A holds NaN or Inf"),
    ("tensor-nan-other-task", retensor(_poison(f"{V}.coeffs_A", float("nan"))), "b", "holds NaN or Inf"),
    ("extra-tensor-nan", retensor(_poison(f"extra.{HEAD}", float("nan"))), "a", "holds NaN or Inf"),
    ("tensor-missing", retensor(lambda t: t.pop(f"{Q}.coeffs_A")), "a", "tensor coeffs_A is missing"),
    ("tensor-int", retensor(lambda t: t.update({f"{Q}.basis_B": t[f"{Q}.basis_B"].to(torch.int32)})), "a",
     "is int32 but"),
    ("tensor-mean-uncentred", module(Q, center=False), "a", "not centred"),
    ("tensor-overflow", retensor(_overflow), "a", "non-finite"),
]


@pytest.mark.parametrize("damage,task_name,message", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_bundle_is_refused_in_one_line(bundle, damage, task_name, message):
    damage(bundle)
    case = bundle.parent
    before = sorted(p.name for p in case.iterdir())
    result = reconstruct(bundle, task_name, case / "out")
    after = sorted(p.name for p in case.iterdir())
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # refused, not crashed: no traceback
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and len(lines[0]) <= len("error: ") + MAX_MESSAGE, lines[0]
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    assert after == before  # neither OUT nor .out.tmp-* nor .out.lock


def test_the_checks_are_in_the_library_too(bundle):
    """ReversibleBundle.load and summary_table refuse the same manifests with BundleError."""
    edit(lambda m: m.update(dtype="__class__"))(bundle)
    with pytest.raises(BundleError, match="dtype"):
        ReversibleBundle.load(bundle)
    with pytest.raises(BundleError, match="dtype"):
        summary_table(bundle)


def test_out_may_not_be_the_bundle(bundle):
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    result = reconstruct(bundle, "a", bundle, "--overwrite")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert len(result.stderr.splitlines()) == 1 and "bundle" in result.stderr
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]


def test_valid_bundle_still_reconstructs(built, bundle):
    adapters = built[1]
    case = bundle.parent
    for path in adapters:
        out = case / f"{path.name}-back"
        result = reconstruct(bundle, path.name, out)
        assert result.exit_code == 0, result.output
        assert result.stderr == "" and f"task {path.name!r} rebuilt" in result.stdout
        for name in (Q, V):
            ref = merged_delta(path, name)
            got = merged_delta(out, name)
            assert (got is None) == (ref is None)
            if ref is not None:
                assert float((got - dense_delta(path, name)).norm() / ref.norm()) <= 1e-5
    carried = load_file(str(case / "a-back" / "adapter_model.safetensors"))
    assert torch.equal(carried[HEAD], torch.ones(2, 16))
    assert HEAD not in load_file(str(case / "b-back" / "adapter_model.safetensors"))
    assert sorted(p.name for p in case.iterdir()) == ["a-back", "b-back", "bundle", "c-back"]  # no staging left over


def test_half_precision_bundle_reconstructs(built, tmp_path):
    """A bundle stored in float16 passes the dtype checks and rebuilds in float16."""
    adapters = built[1]
    recipe = write_recipe(tmp_path / "h.yml", "rmm", [(p, None) for p in adapters], {"p": 2}, dtype="float16")
    run_merge(load_recipe(recipe), tmp_path / "h", quiet=True, write_card=False)
    assert json.loads((tmp_path / "h" / "reversible.json").read_text())["dtype"] == "float16"
    result = reconstruct(tmp_path / "h", "c", tmp_path / "c-back")
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "c-back" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
