"""The quality benchmark's harness, end to end on a tiny random BERT with two tiny tasks (seconds, no data files)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from benchmarks.quality import report
from benchmarks.quality.evaluate import Evaluator, evaluate_adapter_factors
from benchmarks.quality.harness import norm_spread, run_benchmark
from benchmarks.quality.methods import PEFT_COMBINATIONS, load_factors
from benchmarks.quality.model import Encoder, accuracy
from benchmarks.quality.tasks import Task, balanced_splits, parse_synset
from benchmarks.quality.train import save_adapter, train_adapter
from lowrank_methods.core.method import list_methods

COLORS = ["red", "blue", "green"]
SIZES = ["big", "small"]
THINGS = ["car", "dog", "house", "tree", "boat", "cup", "hat", "ball"]
WORDS = ["the", "a", "very", "old", "new", *COLORS, *SIZES, *THINGS]


def _tasks() -> dict[str, Task]:
    g = torch.Generator().manual_seed(0)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    def examples(n, labels, make):
        out = []
        for i in range(n):
            y = i % len(labels)
            out.append((make(labels[y]), y))
        return out

    color = lambda c: f"{pick(['the', 'a'])} {pick(SIZES)} {c} {pick(THINGS)}"  # noqa: E731
    size = lambda s: f"{pick(['the', 'a', 'very'])} {s} {pick(COLORS)} {pick(THINGS)}"  # noqa: E731
    return {
        "color": Task("color", COLORS, examples(48, COLORS, color), examples(24, COLORS, color), examples(30, COLORS, color)),
        "size": Task("size", SIZES, examples(48, SIZES, size), examples(24, SIZES, size), examples(30, SIZES, size)),
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("quality")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    encoder = Encoder(BertModel(config, add_pooling_layer=False).eval(), tokenizer)
    tasks = _tasks()
    evaluator = Evaluator(encoder, tasks)
    dirs = {}
    for name, task in tasks.items():
        model = train_adapter(encoder, task, evaluator.heads[name], rank=4, alpha=8, steps=12, batch_size=16, lr=2e-2)
        dirs[name] = root / "adapters" / name
        save_adapter(model, dirs[name])
    return root, encoder, tasks, evaluator, dirs


def test_saved_adapter_is_portable_fp16(bench):
    _, _, _, _, dirs = bench
    cfg = json.loads((dirs["color"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    from safetensors.torch import load_file

    tensors = load_file(dirs["color"] / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 6 and all(t.dtype == torch.float16 for t in tensors.values())


def test_applying_factors_matches_peft_forward(bench):
    """Adding B@A to the base weights scores exactly like PEFT's own LoRA forward, and restores the base."""
    from peft import PeftModel
    import copy

    _, encoder, tasks, evaluator, dirs = bench
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    factors = load_factors([dirs["color"]], dtype=torch.float64)
    ours = evaluate_adapter_factors({m: fs[0] for m, fs in factors.items()}, tasks, evaluator=evaluator, split="test")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(encoder.model), dirs["color"]).eval()
    reference = accuracy(Encoder(peft_model, encoder.tokenizer), evaluator.heads["color"], tasks["color"].test)
    assert ours["color"] == pytest.approx(reference, abs=1e-9)
    emb_ref = Encoder(peft_model, encoder.tokenizer).embed([t for t, _ in tasks["color"].test])
    with evaluator.applied({m: fs[0] for m, fs in factors.items()}):
        emb_ours = encoder.embed([t for t, _ in tasks["color"].test])
    assert torch.allclose(emb_ours, emb_ref, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())


def test_harness_end_to_end(bench, tmp_path):
    _, encoder, tasks, evaluator, dirs = bench
    result = run_benchmark(evaluator, dirs, set_name="main", quick=(0.5, 1.0), log=lambda *_: None)
    labels = {row.label for row in result.rows}
    for m in list_methods():
        if m.output != "bundle":
            assert any(label.split("[")[0] == m.name for label in labels), m.name
    assert {f"peft:{c}" for c in PEFT_COMBINATIONS} <= labels
    by = {row.label: row for row in result.rows}
    assert by["individual adapters"].mean == 1.0
    for row in result.rows:
        if row.normalized:
            assert set(row.normalized) == set(tasks)
            assert all(0.0 <= v <= 1.0 / min(result.individual.values()) for v in row.normalized.values())
            assert row.normalized == pytest.approx({t: row.accuracy[t] / result.individual[t] for t in tasks})

    # cat at λ = 1 is the exact sum; score it against a dense Σ B_t A_t built here
    cat = by["cat"]
    factors = load_factors([dirs[t] for t in tasks], dtype=torch.float64)
    dense = {m: cat.chosen["lambda"] * sum(f.dense() for f in fs) for m, fs in factors.items()}
    assert evaluator.scores(dense, "test") == pytest.approx(cat.accuracy, abs=1e-9)

    # report: table, chart, and only the quality section of the doc is replaced
    text = report.table(result)
    assert all(label in text for label in labels)
    (tmp_path / "results").mkdir()
    record = {"result": asdict(result), "command": "python -m benchmarks.quality --quick", "machine": "test", "date": "today"}
    (tmp_path / "results" / "main.json").write_text(json.dumps(record))
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n## Scale\nkeep me\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    report.publish(tmp_path / "results", doc, tmp_path / "img" / "quality.png")
    out = doc.read_text()
    assert "keep me" in out and out.endswith("tail\n") and "\nold\n" not in out and "peft:svd" in out
    assert (tmp_path / "img" / "quality.png").stat().st_size > 1000
    assert (tmp_path / "img" / "quality-size.png").stat().st_size > 1000


def test_rows_keep_per_item_results_and_compare_with_mtc(bench):
    """Every scored row keeps its per-item test results; rows with a rule are compared with mtc[rule] by the
    paired bootstrap, and the budgeted rows stay within the uniform rank's parameters."""
    from benchmarks.quality.stats import unpack

    _, _, tasks, evaluator, dirs = bench
    result = run_benchmark(evaluator, dirs, set_name="main", quick=(1.0,), peers=False, log=lambda *_: None,
                           methods=["mtc", "ctm", "tsv", "tsv+budget16", "task_arithmetic+budget16"])
    by = {row.label: row for row in result.rows}
    for row in result.rows:
        if row.normalized and row.label != "individual adapters":  # that row is each adapter on its own task
            assert {t: unpack(row.correct[t]).float().mean().item() for t in tasks} == pytest.approx(row.accuracy)
    versus = report.versus_mtc(result)
    assert versus["ctm[ties]"][0] == "mtc[ties]" and versus["tsv"][0] == "mtc[tsv]"
    d = versus["ctm[ties]"][1]
    assert d.low <= d.value <= d.high
    assert d.value == pytest.approx(by["ctm[ties]"].mean - by["mtc[ties]"].mean, abs=1e-9)
    assert "tsv+budget16" in by and by["tsv+budget16"].size_mb <= by["mtc[tsv]"].size_mb + 1e-9
    assert result.norm_spread == norm_spread(load_factors([dirs[t] for t in tasks]))

    # --resume: rows of an earlier run are kept, not recomputed; the others run in the order asked for
    lines = []
    again = run_benchmark(evaluator, dirs, set_name="main", quick=(1.0,), peers=False, log=lines.append,
                          methods=["tsv", "iso_c", "mtc"], done=result.rows)
    merges = [r.label for r in again.rows if r.source != "baseline"]
    assert merges[-1] == "iso_c" and "tsv" in merges and "ctm[ties]" not in merges
    assert not any(line.strip().startswith(("tsv ", "mtc[")) for line in lines)
    assert [line.split()[0] for line in lines if "validation" in line] == ["iso_c"]
    assert again.complete and {r.label: r.mean for r in again.rows if r.label == "tsv"} == {"tsv": by["tsv"].mean}


def test_norm_spread():
    """Per module max/min of the tasks' ‖B A‖_F (a zero update is no task there); median over modules."""
    from lowrank_methods.core.types import LoraFactors

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    one = lambda s: LoraFactors(A, s * B)  # noqa: E731
    spread = norm_spread({"a": [one(1), one(4)], "b": [one(2), one(3), one(0)], "c": [one(1), one(10)]})
    assert spread == pytest.approx({"median": 4.0, "min": 1.5, "max": 10.0})


def test_synset_parsing_and_balanced_splits():
    line = ("00113420 30 v 02 shade 0 tone_down 1 002 @ 00109660 v 0000 ! 00113605 v 0102 02 + 04 00 + 22 01 | pass "
            'from one quality to another by a slight degree; "the butterfly wings shade to yellow"  \n')
    s = parse_synset(line)
    assert (s.lexname, s.pos, s.words) == ("verb.change", "v", ["shade", "tone down"])
    assert s.pointers == [("@", "00109660", "v", 0, 0), ("!", "00113605", "v", 1, 2)]
    assert s.frames == {4, 22} and s.definition == "pass from one quality to another by a slight degree"
    assert s.examples == ["the butterfly wings shade to yellow"]
    groups = {"a": [f"a{i}" for i in range(600)], "b": [f"b{i}" for i in range(500)] + ["b1", "b1"]}
    task = balanced_splits("t", groups)
    splits = [task.train, task.validation, task.test]
    assert [sum(y == 0 for _, y in s) for s in splits] == [sum(y == 1 for _, y in s) for s in splits]
    texts = [t for s in splits for t, _ in s]
    assert len(texts) == len(set(texts)) and len(task.test) >= 300
    assert balanced_splits("t", groups).test == task.test  # deterministic


def test_head_only_probe(bench):
    from benchmarks.quality.probe import fit_linear_head, head_only

    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    labels = torch.arange(300) % 3
    emb = torch.nn.functional.normalize(centers[labels] + 0.2 * torch.randn(300, 16, generator=g), dim=-1)
    W, b = fit_linear_head(emb, labels, init=torch.zeros(3, 16))
    assert ((emb @ W.T + b).argmax(-1) == labels).float().mean() > 0.97
    _, _, tasks, evaluator, _ = bench
    scores = head_only(evaluator, train_per_task=48)
    assert set(scores) == set(tasks)
    zero_shot = {t: evaluator.scores({}, "test", only=[t])[t] for t in tasks}
    assert all(scores[t]["zero_shot"] == pytest.approx(zero_shot[t]) for t in tasks)


def test_subspace_diagnostic(bench):
    """kept fraction against a dense projector built here; MtC is the closest rank-k TA (Eckart–Young)."""
    from benchmarks.quality.subspace import compare, kept_fraction
    from lowrank_methods.core.types import LoraFactors

    g = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 9, generator=g, dtype=torch.float64)
    out = LoraFactors(torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64))
    Pp = out.B @ torch.linalg.pinv(out.B)  # projector onto col(B)
    Qp = torch.linalg.pinv(out.A) @ out.A  # projector onto row(A)
    assert kept_fraction(delta, out) == pytest.approx(float((Pp @ delta @ Qp).square().sum() / delta.square().sum()))
    _, _, _, _, dirs = bench
    sums = compare(load_factors(list(dirs.values()), dtype=torch.float64), rank=2)
    assert sums["mtc[ta]"]["err"] <= sums["ctm[ta]"]["err"] + 1e-9
