"""adapter_config.json, read and typed: hostile configs get one clear line, never a traceback or a wrong scale.

``read_adapter_config`` turns the file into an ``AdapterConfig`` (a pydantic model: the fields we use are typed,
PEFT's dozens of others pass through) or raises one of the adapter errors of ``errors.py``:

* bytes that are not UTF-8, text that is not JSON, JSON that is not an object -> ``CorruptAdapterError``;
* ``peft_type`` other than LORA, options whose update is not ``scale · B @ A`` (DoRA, lora_bias, …) and
  initialisations that also changed the base weights (PiSSA, OLoRA, …) -> ``UnsupportedAdapterError``;
* a field of the wrong type or out of range (``r: 4.7``, ``r: 0``, ``lora_alpha: NaN``) -> ``CorruptAdapterError``
  naming the field, e.g. ``adapter_config.json: r: Input should be a valid integer (got 4.7)``.

rank_pattern / alpha_pattern keys are regular expressions that PEFT matches with
``re.match(rf"(.*\\.)?({key})$", module)``, the first key in dict order winning
(``peft.utils.other.get_pattern_key``). Python's backtracking ``re`` takes exponential time on hostile keys, so
each key is compiled once, here, into google-re2 (linear time) with exactly Python's meaning: the key is parsed
by Python's own regex parser and the parse tree is written out as RE2 syntax, so RE2's different readings of
the same text (``a{,3}``, ``[[:alpha:]]``, ``$``, ``\\s``) never apply. Keys that Python cannot compile are
refused (PEFT could not load the adapter either); so are keys with constructs RE2 has no linear-time equivalent
for (backreferences, lookaround, atomic groups, possessive quantifiers).

Python's ``\\w``, ``\\d``, ``\\s``, ``\\b`` and case-insensitive matching follow its Unicode tables; the RE2 form
reproduces them exactly on ASCII module names (every real module name), and a module name outside ASCII
meeting such a key is refused with one line rather than matched by guesswork.

``written_config`` builds the adapter_config.json of an adapter this tool writes (merged, rebuilt from a bundle,
or a full model's PT-SVD delta): scale 1 everywhere, and ``exact_pattern`` keys where module ranks differ.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from re import _compiler as _sre_compile  # Python's own regex parser and compiler: the meaning PEFT gets
from re import _constants as _C
from re import _parser as _sre_parse
from typing import Annotated, Any

import re2  # google-re2: linear-time matching
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError

from lowrank_methods.core.errors import AdapterError, CorruptAdapterError, UnsupportedAdapterError, one_line, short

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 2**20      # PEFT configs are a few kB; a 10,000-entry rank_pattern is about 1 MB
MAX_PATTERN_ENTRIES = 10_000       # per rank_pattern / alpha_pattern
MAX_KEY_CHARS = 4096               # one pattern key
MAX_PATTERN_CHARS = 1_000_000      # all keys of one pattern together (parsing costs ~3 µs a character)
MAX_ALPHA = 1e6                    # |lora_alpha|: keeps the scale (and every sum of scaled factors) sane
MAX_RANK = 2**31 - 1
MAX_INT_DIGITS = 4000              # below Python's own int-parsing limit (4300), which would raise mid-parse

# PEFT options whose adapters are not a plain sum of B @ A; merging them as LoRA would be silently wrong.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adapters rescale the whole weight and cannot be merged as B @ A; merge them into the base first",
    "lora_bias": "adapters with lora_bias carry a bias that B @ A does not; retrain without lora_bias",
    "use_qalora": "QA-LoRA adapters are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "target_parameters": "adapters on target_parameters (e.g. MoE experts) are not supported",
    "trainable_token_indices": "adapters with trainable_token_indices are not supported",
}
# init_lora_weights values whose training also rewrote the base weights (PEFT converts them back on save only
# when asked to, with path_initial_model_for_weight_conversion).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "eva", "loftq", "lora_ga")

Rank = Annotated[int, Field(strict=True, ge=1, le=MAX_RANK)]
Alpha = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ALPHA, le=MAX_ALPHA)]


class AdapterConfig(BaseModel):
    """The fields of a PEFT LoRA adapter_config.json that merging reads, typed; every other field is kept."""

    model_config = ConfigDict(extra="allow")

    peft_type: str
    r: Rank = 8
    lora_alpha: Alpha = 8
    use_rslora: StrictBool | None = False
    fan_in_fan_out: StrictBool | None = False
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Alpha] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    init_lora_weights: StrictBool | str | None = True
    modules_to_save: list[str] | None = None
    target_modules: list[str] | str | None = None

    _rank_table: "PatternTable" = PrivateAttr(default=None)
    _alpha_table: "PatternTable" = PrivateAttr(default=None)

    # -- what merging asks ---------------------------------------------------------------------
    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of ``module`` after rank_pattern / alpha_pattern, exactly as PEFT resolves them."""
        r = self.rank_table.lookup(module, self.r)
        alpha = self.alpha_table.lookup(module, self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def rank_table(self) -> "PatternTable":
        if self._rank_table is None:
            self._rank_table = PatternTable("rank_pattern", self.rank_pattern or {})
        return self._rank_table

    @property
    def alpha_table(self) -> "PatternTable":
        if self._alpha_table is None:
            self._alpha_table = PatternTable("alpha_pattern", self.alpha_pattern or {})
        return self._alpha_table


# -- reading ----------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path, *, adapter: str | None = None) -> tuple[AdapterConfig, dict]:
    """``path`` (the adapter directory or the json file itself) -> (typed config, the plain dict as read)."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in {short(str(path), 120)}; point the recipe at a PEFT adapter directory",
                           adapter=adapter)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterError(f"cannot read {file.name} ({e.strerror or type(e).__name__})", adapter=adapter) from e
    return parse_adapter_config(raw, adapter=adapter, filename=file.name)


def parse_adapter_config(raw: bytes, *, adapter: str | None = None,
                         filename: str = CONFIG_FILE) -> tuple[AdapterConfig, dict]:
    """The bytes of an adapter_config.json -> (typed config, plain dict); one typed error line otherwise."""

    def corrupt(what: str) -> CorruptAdapterError:
        return CorruptAdapterError(one_line(f"{filename}: {what}", 260), adapter=adapter)

    if len(raw) > MAX_CONFIG_BYTES:
        raise corrupt(f"is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a PEFT adapter config is a few kB")
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors add: not part of the JSON
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f"is not UTF-8 text (bad byte at offset {e.start}); re-save the adapter with PEFT") from e
    try:
        data = json.loads(text, parse_int=_parse_int)
    except _TooManyDigits as e:
        raise corrupt(f"holds a number with {e.args[0]} digits") from e
    except json.JSONDecodeError as e:
        raise corrupt(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); re-save the adapter with PEFT") from e
    except RecursionError:
        raise corrupt("nests JSON too deeply to be an adapter config")
    if not isinstance(data, dict):
        raise corrupt(f"holds a JSON {_json_kind(data)}, not an object; is it a PEFT adapter config?")
    check_config(data, adapter)
    for field in ("rank_pattern", "alpha_pattern"):  # before validation: a huge pattern is refused at once
        pattern = data.get(field)
        if isinstance(pattern, dict) and len(pattern) > MAX_PATTERN_ENTRIES:
            raise corrupt(f"{field} has {len(pattern):,} entries; at most {MAX_PATTERN_ENTRIES:,} are supported")
    try:
        config = AdapterConfig.model_validate(data)
    except ValidationError as e:
        raise corrupt(_validation_line(e)) from e
    config._rank_table = PatternTable("rank_pattern", config.rank_pattern or {}, adapter=adapter, filename=filename)
    config._alpha_table = PatternTable("alpha_pattern", config.alpha_pattern or {}, adapter=adapter, filename=filename)
    return config, data


def check_config(config: dict, adapter: str | None = None) -> None:
    """Refuse adapter configs whose update is not ``scale · B @ A`` (one line each, UnsupportedAdapterError)."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(f"peft_type is {short(peft_type)}; only LORA adapters can be merged", adapter=adapter)
    for option, why in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise UnsupportedAdapterError(why, adapter=adapter)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={short(init)} also changes the base weights; convert the adapter to a plain LoRA first "
            "(PEFT's path_initial_model_for_weight_conversion)",
            adapter=adapter,
        )


class _TooManyDigits(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _TooManyDigits(len(text))
    return int(text)


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _validation_line(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = ".".join(one_line(str(p), 40) for p in first["loc"]) or "config"
    line = f"{loc}: {first['msg']}"
    if first.get("type") not in ("missing",):
        line += f" (got {short(first.get('input'), 40)})"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


# -- rank_pattern / alpha_pattern ---------------------------------------------------------------------
class PatternTable:
    """A rank_pattern or alpha_pattern, compiled once: ``lookup(module, default)`` is PEFT's resolution."""

    BLOCK = 64  # regex keys tried together as one alternation before the keys of a matching block one by one

    def __init__(self, field: str, pattern: dict[str, Any], *, adapter: str | None = None,
                 filename: str = CONFIG_FILE):
        self.field = field
        self.adapter = adapter
        self.raw = dict(pattern)
        self.keys: list[str] = list(pattern)
        self.values = list(pattern.values())
        self.literal: dict[str, int] = {}  # plain-name keys: name -> first index
        self.regex: list[list] = []  # [index, re2 text, exact on ASCII names only, re2 regexp once compiled]
        self.blocks: list[tuple[int, Any, list]] = []  # (first index, alternation or None, its regex entries)
        if len(pattern) > MAX_PATTERN_ENTRIES:
            raise self._error(f"has {len(pattern):,} entries; at most {MAX_PATTERN_ENTRIES:,} are supported", filename)
        total = sum(len(k) for k in self.keys)
        if total > MAX_PATTERN_CHARS:
            raise self._error(f"keys hold {total:,} characters; at most {MAX_PATTERN_CHARS:,} are supported", filename)
        texts = []
        for i, key in enumerate(self.keys):
            compiled = compile_pattern_key(key, field=field, adapter=adapter, filename=filename, validate_only=True)
            if isinstance(compiled, str):
                self.literal.setdefault(compiled, i)
            else:
                text, ascii_only = compiled
                self.regex.append([i, text, ascii_only, None])
                texts.append(text)
        for start in range(0, len(self.regex), self.BLOCK):
            entries = self.regex[start:start + self.BLOCK]
            try:
                union = re2.compile("|".join(f"(?:{t})" for t in texts[start:start + self.BLOCK]), _RE2_OPTIONS)
            except Exception:  # a key re2 refuses (found and named below), or a block too large as one program
                union = None
                for entry in entries:
                    entry[3] = _re2_compile(self.keys[entry[0]], entry[1], field, adapter, filename)
            self.blocks.append((entries[0][0], union, entries))

    def _error(self, what: str, filename: str) -> CorruptAdapterError:
        return CorruptAdapterError(one_line(f"{filename}: {self.field} {what}", 260), adapter=self.adapter)

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, module: str) -> int | None:
        """Index of the first key (dict order) that PEFT's ``re.match(rf"(.*\\.)?({key})$", module)`` accepts."""
        if not self.keys:
            return None
        if "\n" in module:  # LoRA module names never hold one (factors.LORA_KEY); PEFT's `$` would read it apart
            raise AdapterError(f"module name {short(module)} holds a newline", adapter=self.adapter)
        best = None
        if self.literal:  # a plain key matches the module itself or what follows any of its dots
            best = self.literal.get(module)
            dot = module.find(".")
            while dot != -1:
                i = self.literal.get(module[dot + 1:])
                if i is not None and (best is None or i < best):
                    best = i
                dot = module.find(".", dot + 1)
        if not self.regex:
            return best
        if not module:  # Python's \B never matches in an empty string, re2's does; module names are never empty
            raise AdapterError("a module has an empty name; the adapter file is corrupt", adapter=self.adapter)
        try:
            module.encode("utf-8")
        except UnicodeEncodeError:
            raise AdapterError(f"module name {short(module)} is not valid text; the adapter file is corrupt",
                               adapter=self.adapter)
        ascii_module = module.isascii()
        for first, union, entries in self.blocks:
            if best is not None and first > best:
                break
            if ascii_module and union is not None and union.match(module) is None:
                continue
            for entry in entries:
                i, text, ascii_only, regexp = entry
                if best is not None and i > best:
                    return best
                if ascii_only and not ascii_module:
                    raise AdapterError(
                        f"{self.field} key {short(self.keys[i])} uses \\w, \\d, \\s, \\b or case-insensitive matching, "
                        f"which cannot be matched exactly against the non-ASCII module name {short(module)}",
                        adapter=self.adapter,
                    )
                if regexp is None:  # its block compiled, so it does too
                    regexp = entry[3] = _re2_compile(self.keys[i], text, self.field, self.adapter, CONFIG_FILE)
                if regexp.match(module) is not None:
                    return i
        return best

    def lookup(self, module: str, default):
        """PEFT's value for ``module``: the first matching key's, else ``pattern.get(module, default)``."""
        i = self.index(module)
        if i is None:
            return self.raw.get(module, default)  # get_pattern_key returns the module itself when no key matches
        return self.values[i]


_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_]|\\\.)+")        # q_proj, model\.layers\.0\.q_proj: literal names
_DOTTED_KEY = re.compile(r"(?:[A-Za-z0-9_.]|\\\.)+")      # model.layers.0.q_proj: each bare dot is any character


def compile_pattern_key(key: str, *, field: str = "rank_pattern", adapter: str | None = None,
                        filename: str = CONFIG_FILE, validate_only: bool = False):
    """One rank_pattern/alpha_pattern key -> the plain module-name suffix (a str) when the key is literal, else
    ``(re2 regexp, ascii_only)`` matching exactly what ``re.match(rf"(.*\\.)?({key})$", name)`` matches on
    newline-free names (``ascii_only``: exact on ASCII names only); with ``validate_only``, ``(re2 text, ascii_only)``
    and re2 is left to the caller. Raises ``CorruptAdapterError`` (one line) for keys Python or re2 cannot handle."""

    def refuse(what: str) -> CorruptAdapterError:
        return CorruptAdapterError(one_line(f"{filename}: {field} key {short(key, 80)} {what}", 260), adapter=adapter)

    if len(key) > MAX_KEY_CHARS:
        raise refuse(f"is {len(key):,} characters long; at most {MAX_KEY_CHARS:,} are supported")
    if _PLAIN_KEY.fullmatch(key):  # the fast paths need no parser: these characters mean themselves to Python
        return key.replace("\\.", ".")
    ctx = _Translation()
    if _DOTTED_KEY.fullmatch(key):
        tokens = re.findall(r"\\\.|.", key)  # "\\." is a dot, a bare "." any character but a newline
        text = _WRAP_HEAD + "".join(_char(46) if t == "\\." else r"[^\n]" if t == "." else _char(ord(t))
                                    for t in tokens) + r")\z"
    else:
        prefix = "(.*\\.)?("
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FutureWarning on "[[" and the like: Python's reading is kept
                tree = _sre_parse.parse(f"{prefix}{key})$", 0)
        except RecursionError:
            raise refuse("nests too deeply to be a regular expression")
        except Exception as e:  # re.error, OverflowError, …: PEFT's re.match would raise the same
            msg = getattr(e, "msg", None) or str(e) or type(e).__name__
            pos = getattr(e, "pos", None)
            where = f" at position {pos - len(prefix)}" if isinstance(pos, int) and pos >= len(prefix) else ""
            raise refuse(f"is not a valid regular expression ({msg}{where}); PEFT could not load this adapter") from e
        literal = _literal_key(tree)
        if literal is not None:
            return literal
        try:
            text = ctx.emit(tree.data, tree.state.flags)
        except _Unsupported as e:
            raise refuse(f"uses {e.args[0]}, which linear-time matching (re2) cannot express; "
                         "list the module names instead") from e
        except RecursionError:
            raise refuse("nests too deeply to be a regular expression")
    if validate_only:
        return text, ctx.ascii_only
    return _re2_compile(key, text, field, adapter, filename), ctx.ascii_only


def _re2_compile(key: str, text: str, field: str, adapter: str | None, filename: str):
    try:
        return re2.compile(text, _RE2_OPTIONS)
    except Exception as e:  # re2.error: too many repetitions, too large a program, …
        detail = e.args[0] if e.args else e
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise CorruptAdapterError(one_line(f"{filename}: {field} key {short(key, 80)} is too complex for linear-time "
                                           f"matching (re2: {short(str(detail), 60)})", 260), adapter=adapter) from e


# -- Python regex parse tree -> RE2 syntax ----------------------------------------------------------------
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # re2 would print its own parse errors to stderr
_NEVER = r"[^\x{0}-\x{10FFFF}]"
_WRAP_HEAD = r"(?:(?:[^\n])*\x{2E})?(?:"  # PEFT's (.*\.)?( … )$ around every key
_ANY_CHAR = r"[\x{0}-\x{10FFFF}]"
_IGNORECASE = _C.SRE_FLAG_IGNORECASE
_DOTALL = _C.SRE_FLAG_DOTALL
_ASCII_CLASS_CACHE: dict[tuple[str, int], str] = {}


class _Unsupported(Exception):
    pass


def _literal_key(tree) -> str | None:
    """The name when the whole PEFT pattern is ``(.*\\.)?(NAME)$`` with NAME plain characters (the common case)."""
    data = tree.data
    if tree.state.flags & _IGNORECASE or len(data) != 3 or data[2] != (_C.AT, _C.AT_END):
        return None
    op, av = data[1]
    if op is not _C.SUBPATTERN or av[1] or av[2]:
        return None
    chars = av[3].data
    if not chars or any(op is not _C.LITERAL for op, _ in chars):
        return None
    return "".join(chr(c) for _, c in chars)


def _char(c: int) -> str:
    """One character as RE2 syntax, the same inside and outside a class."""
    return chr(c) if c < 128 and (chr(c).isalnum() or c == 95) else "\\x{%X}" % c


class _Translation:
    """Writes a Python regex parse tree as RE2 syntax with the same meaning on newline-free text."""

    def __init__(self):
        self.ascii_only = False  # a part is exact on ASCII text only (Unicode classes, \b, ignore-case)

    def emit(self, items, flags: int) -> str:
        return "".join(self.item(op, av, flags) for op, av in items)

    def item(self, op, av, flags: int) -> str:
        if op is _C.LITERAL:
            if flags & _IGNORECASE:
                return self.ascii_class((op, av), flags)
            return _char(av)
        if op is _C.NOT_LITERAL:
            if flags & _IGNORECASE:
                return self.ascii_class((op, av), flags)
            return f"[^{_char(av)}]"
        if op is _C.ANY:
            return _ANY_CHAR if flags & _DOTALL else r"[^\n]"
        if op is _C.IN:
            if flags & _IGNORECASE or any(o is _C.CATEGORY for o, _ in av):
                return self.ascii_class((op, av), flags)
            negate = bool(av) and av[0][0] is _C.NEGATE
            parts = []
            for o, a in av[1:] if negate else av:
                if o is _C.LITERAL:
                    parts.append(_char(a))
                elif o is _C.RANGE:
                    parts.append(f"{_char(a[0])}-{_char(a[1])}")
                else:
                    raise _Unsupported(f"the class item {o}")
            if not parts:
                return _ANY_CHAR if negate else _NEVER
            return f"[{'^' if negate else ''}{''.join(parts)}]"
        if op is _C.BRANCH:
            return "(?:" + "|".join(self.emit(b.data, flags) for b in av[1]) + ")"
        if op is _C.SUBPATTERN:
            _group, add, delete, sub = av
            inner = _sre_compile._combine_flags(flags, add, delete)
            return "(?:" + self.emit(sub.data, inner) + ")"
        if op is _C.MAX_REPEAT or op is _C.MIN_REPEAT:  # greedy or lazy: the same set of matches
            lo, hi, sub = av
            body = "(?:" + self.emit(sub.data, flags) + ")"
            if hi is _C.MAXREPEAT or hi == _C.MAXREPEAT:
                return body + ("*" if lo == 0 else "+" if lo == 1 else "{%d,}" % lo)
            return body + ("?" if (lo, hi) == (0, 1) else "{%d}" % lo if lo == hi else "{%d,%d}" % (lo, hi))
        if op is _C.AT:
            if av in (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING):
                return r"\A"  # newline-free text: ^ (even multiline) is the start
            if av in (_C.AT_END, _C.AT_END_STRING):
                return r"\z"  # newline-free text: $ is the end
            if av in (_C.AT_BOUNDARY, _C.AT_NON_BOUNDARY):
                self.ascii_only = True  # Python's \b follows Unicode \w; re2's is ASCII (equal on ASCII text)
                return r"\b" if av is _C.AT_BOUNDARY else r"\B"
            raise _Unsupported(f"the anchor {av}")
        if op is _C.GROUPREF or op is _C.GROUPREF_EXISTS:
            raise _Unsupported("a backreference")
        if op is _C.ASSERT or op is _C.ASSERT_NOT:
            raise _Unsupported("a lookahead or lookbehind")
        if op is _C.ATOMIC_GROUP or op is _C.POSSESSIVE_REPEAT:
            raise _Unsupported("an atomic group or possessive quantifier")
        raise _Unsupported(f"the construct {op}")

    def ascii_class(self, node, flags: int) -> str:
        """A one-character node RE2 reads differently (Unicode classes, ignore-case): the exact set of ASCII
        characters Python's own engine accepts for it, as an RE2 class."""
        self.ascii_only = True
        cache_key = (repr(node), flags)
        cached = _ASCII_CLASS_CACHE.get(cache_key)
        if cached is not None:
            return cached
        state = _sre_parse.State()
        state.flags = flags
        rx = _sre_compile.compile(_sre_parse.SubPattern(state, [node]), flags)
        chars = [c for c in range(128) if rx.match(chr(c))]
        if not chars:
            out = _NEVER
        else:
            runs, start = [], chars[0]
            for prev, c in zip(chars, chars[1:] + [None]):
                if c != prev + 1 if c is not None else True:
                    runs.append(_char(start) if start == prev else f"{_char(start)}-{_char(prev)}")
                    start = c
            out = "[" + "".join(runs) + "]"
        if len(_ASCII_CLASS_CACHE) < 4096:
            _ASCII_CLASS_CACHE[cache_key] = out
        return out


# -- writing -------------------------------------------------------------------------------------------------------
def written_config(ranks: dict[str, int], source: dict, modules_to_save: list[str]) -> dict:
    """The adapter_config.json of an adapter we write: ``r == lora_alpha`` (scale 1, every input scale folded into
    the factors), ``rank_pattern``/``alpha_pattern`` for the modules whose rank is not the largest; the task type,
    base model, revision and fan_in_fan_out come from ``source`` (an input's config)."""
    r = max(ranks.values(), default=1)
    pattern = {exact_pattern(m): k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": source.get("task_type"),
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "revision": source.get("revision"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(source.get("fan_in_fan_out", False)),
        "modules_to_save": modules_to_save or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "peft_version": _peft_version(),
    }


def exact_pattern(module: str) -> str:
    """A rank_pattern key that PEFT (``re.match(rf"(.*\\.)?({key})$", name)``) matches to this module's name: the
    name with every regex character escaped."""
    return re.escape(module)


def _peft_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None


def peft_pattern_key(keys, module: str) -> str:
    """``peft.utils.other.get_pattern_key`` with compiled keys (for tests and tools): the first key that matches,
    else the module itself."""
    table = PatternTable("rank_pattern", {k: 1 for k in keys})
    i = table.index(module)
    return module if i is None else table.keys[i]
