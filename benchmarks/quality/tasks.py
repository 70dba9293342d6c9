"""The eight text-classification tasks, built deterministically from WordNet 3.0 and BSD fortunes.

Each task is a list of ``(text, label)`` examples, class-balanced and split train/validation/test with a
fixed seed. ``build_all`` reads the Debian files (``apt-get install wordnet-base fortunes``) and is run
once by ``python -m benchmarks.quality.tasks``; the result is committed as JSONL so that the benchmark and
its CI test never need the Debian packages.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "minilm-wordnet8" / "data"
SEED = 0
TRAIN, VALIDATION, TEST = 2000, 200, 300  # per task, spread evenly over the classes (rounded up for val/test)
# A second validation block, drawn from after each class's training items, so that train and test stayed the
# same when validation grew from 200 to 400 items (enough to tell methods apart by paired bootstrap).
MORE_VALIDATION = 200

# The 45 WordNet lexicographer files (wnres/lexnames is not in the Debian package).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
INTRANSITIVE_FRAMES = {1, 2, 3, 4, 7, 12, 13, 22, 23}
FORTUNE_FILES = ("computers", "politics", "science", "work", "songs-poems", "men-women")


@dataclass(frozen=True)
class Task:
    """One classification task: label names (they define the frozen head) and the three splits."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def split(self, name: str) -> list[tuple[str, int]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


@dataclass
class Synset:
    offset: str
    pos: str  # n v a r (satellites 's' folded into 'a')
    lexname: str
    words: list[str]
    pointers: list[tuple[str, str, str, int, int]]  # (symbol, offset, pos, source word, target word)
    frames: set[int]
    gloss: str

    @property
    def definition(self) -> str:
        return self.gloss.split('; "')[0].strip()

    @property
    def examples(self) -> list[str]:
        return re.findall(r'"([^"]+)"', self.gloss)


def parse_synset(line: str) -> Synset:
    """``offset lexfile ss_type w_cnt(hex) [word lex_id]* p_cnt [sym offset pos src/tgt]* [f_cnt [+ f w]*] | gloss``."""
    head, gloss = line.split(" | ", 1)
    f = head.split()
    offset, lexfile, ss_type, n_words = f[0], int(f[1]), f[2], int(f[3], 16)
    words = [_clean_word(f[4 + 2 * i]) for i in range(n_words)]
    i = 4 + 2 * n_words
    n_ptr = int(f[i])
    pointers = []
    for j in range(n_ptr):
        sym, off, pos, st = f[i + 1 + 4 * j: i + 5 + 4 * j]
        pointers.append((sym, off, "a" if pos == "s" else pos, int(st[:2], 16), int(st[2:], 16)))
    i += 1 + 4 * n_ptr
    frames = set()
    if ss_type == "v" and i < len(f):
        n_frames = int(f[i])
        frames = {int(f[i + 2 + 3 * k]) for k in range(n_frames)}
    pos = "a" if ss_type == "s" else ss_type
    return Synset(offset, pos, LEXNAMES[lexfile], words, pointers, frames, gloss.strip())


def _clean_word(w: str) -> str:
    return re.sub(r"\(.*\)$", "", w).replace("_", " ")


def read_wordnet(root: Path = WORDNET) -> dict[tuple[str, str], Synset]:
    synsets = {}
    for pos, fname in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        with open(root / f"data.{fname}", encoding="latin-1") as fh:
            for line in fh:
                if not line.startswith("  "):
                    s = parse_synset(line)
                    synsets[(pos, s.offset)] = s
    return synsets


def read_fortunes(root: Path = FORTUNES) -> dict[str, list[str]]:
    out = {}
    for name in FORTUNE_FILES:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        items = (" ".join(chunk.split()) for chunk in text.split("\n%\n"))
        out[name] = [t for t in items if 20 <= len(t) <= 400]
    return out


# -- the task definitions: each returns {label name: [texts]} -------------------------------------
def _lex_task(synsets, lexnames, text):
    groups = {name.split(".")[1]: [] for name in lexnames}
    for s in synsets.values():
        if s.lexname in lexnames and s.definition:
            groups[s.lexname.split(".")[1]].append(text(s))
    return groups


POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}


def noun8(syn):
    return _lex_task(syn, [f"noun.{x}" for x in "animal plant food artifact person location body substance".split()],
                     lambda s: f"{s.words[0]}: {s.definition}")


def nounabs8(syn):
    return _lex_task(syn, [f"noun.{x}" for x in "act communication state attribute cognition group time quantity".split()],
                     lambda s: f"{s.words[0]}: {s.definition}")


def verb8(syn):
    names = "change contact communication motion social possession cognition creation".split()
    return _lex_task(syn, [f"verb.{x}" for x in names], lambda s: f"{s.words[0]}: {s.definition}")


def pos4(syn):
    groups = {v: [] for v in POS_NAMES.values()}
    for s in syn.values():
        if s.definition:
            groups[POS_NAMES[s.pos]].append(s.definition)
    return groups


def expos4(syn):
    groups = {v: [] for v in POS_NAMES.values()}
    for s in syn.values():
        if s.examples:
            groups[POS_NAMES[s.pos]].append(f"{s.words[0]} | {s.examples[0]}")
    return groups


def rel6(syn):
    groups = {k: [] for k in ("hypernym", "hyponym", "antonym", "synonym", "part", "unrelated")}
    symbols = {"@": "hypernym", "@i": "hypernym", "~": "hyponym", "~i": "hyponym", "!": "antonym", "%p": "part"}
    for s in syn.values():
        for sym, off, pos, src, tgt in s.pointers:
            if sym in symbols and (pos, off) in syn:
                other = syn[(pos, off)]
                w1 = s.words[src - 1] if src else s.words[0]
                w2 = other.words[tgt - 1] if tgt else other.words[0]
                groups[symbols[sym]].append(f"{w1} ; {w2}")
        if len(s.words) >= 2 and s.words[0] != s.words[1]:
            groups["synonym"].append(f"{s.words[0]} ; {s.words[1]}")
    rng = random.Random(SEED + 1)
    nouns = [s for s in syn.values() if s.pos == "n"]
    for _ in range(5000):
        a, b = rng.sample(nouns, 2)
        groups["unrelated"].append(f"{a.words[0]} ; {b.words[0]}")
    return groups


def vtrans3(syn):
    groups = {"transitive": [], "intransitive": [], "ambitransitive": []}
    for s in syn.values():
        if s.pos == "v" and s.frames and s.definition:
            intr = s.frames & INTRANSITIVE_FRAMES
            label = "ambitransitive" if intr and s.frames - intr else ("intransitive" if intr else "transitive")
            groups[label].append(f"{s.words[0]}: {s.definition}")
    return groups


def fort6(_syn, fortunes=None):
    fortunes = fortunes or read_fortunes()
    return {name.replace("-", " and "): texts for name, texts in fortunes.items()}


TASKS = {"noun8": noun8, "nounabs8": nounabs8, "verb8": verb8, "pos4": pos4, "expos4": expos4,
         "rel6": rel6, "fort6": fort6, "vtrans3": vtrans3}


def balanced_splits(name: str, groups: dict[str, list[str]], seed: int = SEED) -> Task:
    """Deduplicate, shuffle each class with a fixed seed, then take equal numbers per class for test, val, train."""
    labels = list(groups)
    k = len(labels)
    n_test, n_val, n_more = math.ceil(TEST / k), math.ceil(VALIDATION / k), math.ceil(MORE_VALIDATION / k)
    per_class = [sorted(set(texts)) for texts in groups.values()]
    smallest = min(len(t) for t in per_class)
    n_train = min(TRAIN // k, smallest - n_test - n_val - n_more)
    if n_train < 10:
        raise ValueError(f"task {name}: the smallest class has only {smallest} examples")
    splits = {"test": [], "validation": [], "train": []}
    for label, texts in enumerate(per_class):
        random.Random(f"{seed}:{name}:{labels[label]}").shuffle(texts)
        splits["test"] += [(t, label) for t in texts[:n_test]]
        splits["validation"] += [(t, label) for t in texts[n_test:n_test + n_val]]
        splits["train"] += [(t, label) for t in texts[n_test + n_val:n_test + n_val + n_train]]
    used = {t for split in splits.values() for t, _ in split}  # a text can sit in two classes (fortunes)
    for label, texts in enumerate(per_class):
        spare = [t for t in texts[n_test + n_val + n_train:] if t not in used]
        splits["validation"] += [(t, label) for t in spare[:n_more]]
    for split in splits.values():
        random.Random(f"{seed}:{name}:order").shuffle(split)
    return Task(name, labels, splits["train"], splits["validation"], splits["test"])


def build_all() -> dict[str, Task]:
    syn = read_wordnet()
    return {name: balanced_splits(name, make(syn)) for name, make in TASKS.items()}


# -- the committed JSONL form ----------------------------------------------------------------------
def save(tasks: dict[str, Task], directory: Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks.values():
        with open(directory / f"{task.name}.jsonl", "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"task": task.name, "labels": task.labels}) + "\n")
            for split in ("train", "validation", "test"):
                for text, label in task.split(split):
                    fh.write(json.dumps({"split": split, "text": text, "label": label}, ensure_ascii=False) + "\n")


def load(directory: Path = DATA_DIR, names: list[str] | None = None) -> dict[str, Task]:
    """The committed tasks, in the order of ``TASKS`` (or of ``names``)."""
    out = {}
    for name in names or [n for n in TASKS if (directory / f"{n}.jsonl").is_file()]:
        with open(directory / f"{name}.jsonl", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            splits = {"train": [], "validation": [], "test": []}
            for line in fh:
                row = json.loads(line)
                splits[row["split"]].append((row["text"], row["label"]))
        out[name] = Task(name, header["labels"], splits["train"], splits["validation"], splits["test"])
    return out


if __name__ == "__main__":
    built = build_all()
    save(built)
    for t in built.values():
        print(f"{t.name:9s} {len(t.labels)} classes  train {len(t.train)}  val {len(t.validation)}  test {len(t.test)}")
