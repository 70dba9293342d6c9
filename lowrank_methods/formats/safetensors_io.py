"""Safetensors files read tensor by tensor, with the header checked against the format's own rules first.

``SafetensorsFile(path)`` accepts exactly the files that ``safetensors.safe_open(path, framework="pt")`` followed
by ``get_tensor`` of every key accepts (safetensors 0.8, checked case by case in tests/test_formats.py), and refuses
every other file with one ``CorruptAdapterError`` line naming the file and what is wrong, before any tensor is read:

* 8 bytes little-endian header length N, N <= 100,000,000, 8 + N <= file size;
* the header: UTF-8, one JSON object as serde_json reads it (JSON whitespace around it allowed, at most 127 nested
  containers, no NaN, no lone surrogate escapes, no number beyond f64 range as serde_json computes it);
* ``__metadata__``: absent, null or a map of strings to strings, given once;
* every other entry: ``{"dtype", "shape", "data_offsets"}`` (other fields ignored; a field twice refused) or the
  same three as a list; dtype a safetensors name (or ``{"F32": null}``, serde's other spelling of an enum);
  shape a list of integers 0..2^64-1; data_offsets two such integers. A tensor name given twice: every value
  must be valid and the last one counts (serde's map);
* entries sorted by offsets tile the data section from 0 without gap or overlap, each holding exactly
  numel · bits / 8 bytes (numel a left fold of the shape that may not overflow 64 bits, whole bytes only), the
  last ending exactly at the end of the file;
* what torch must hold: a dtype torch has (F6_* have none), dimensions below 2^63, F4 with an even last dimension.

Reads are positioned (``os.preadv``) rather than mmapped: pages of modules already merged never stay mapped into
the process, so peak memory is bounded by the modules in flight, not by the file size. ``read_all(raw, name)`` reads
a file already in memory (a bundle, whose bytes were checksummed) with the same checks.

Writing: ``SafetensorsStream`` writes a file tensor by tensor; ``encode_header`` and ``write_tensor`` are its two
halves, for a writer that knows every tensor's size up front (the full-model shards).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from lowrank_methods.core.errors import AdapterError, CorruptAdapterError, one_line, short

MAX_HEADER_SIZE = 100_000_000
MAX_JSON_DEPTH = 127  # serde_json's recursion limit: the 128th nested container is refused
_U64 = 2**64 - 1
_I64 = 2**63 - 1
_I32 = 2**31 - 1
CORRUPT = "the file is corrupt, re-save it with safetensors"
TRUNCATED = "the file is corrupt or truncated; download or save it again"

# safetensors 0.8's dtypes: name -> (bits per element, torch dtype or None where torch has none)
_TORCH_NAMES = {
    "BOOL": "bool", "F4": "float4_e2m1fn_x2", "F6_E2M3": None, "F6_E3M2": None, "U8": "uint8", "I8": "int8",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "F64": "float64", "I64": "int64", "U64": "uint64",
}
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
        "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
DTYPES: dict[str, torch.dtype | None] = {k: getattr(torch, v, None) if v else None for k, v in _TORCH_NAMES.items()}
DTYPE_NAMES = {v: k for k, v in DTYPES.items() if v is not None}


class SafetensorsFile:
    """A validated safetensors file: ``.entries`` (name -> {"dtype", "shape", "data_offsets"}), ``.metadata``,
    ``.shape(key)``, ``.dtype(key)`` and ``.read(key)`` (one positioned read of exactly that tensor's bytes)."""

    def __init__(self, path: str | Path, *, adapter: str | None = None):
        self.path = Path(path)
        self.adapter = adapter
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise AdapterError(f"cannot read {self.path.name} ({e.strerror or type(e).__name__})", adapter=adapter) from e
        try:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self.metadata, self.entries, self.data_start = _layout(st.st_size, lambda n, at: _pread_exact(fd, n, at))
        except _HeaderError as e:
            raise self._corrupt(*e.args) from e
        except OSError as e:
            raise AdapterError(f"cannot read {self.path.name} ({e.strerror or type(e).__name__})", adapter=adapter) from e
        finally:
            os.close(fd)

    def _corrupt(self, what: str, advice: str = CORRUPT) -> CorruptAdapterError:
        return CorruptAdapterError(one_line(f"{self.path.name}: {what}; {advice}", 250), adapter=self.adapter)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def read(self, key: str) -> torch.Tensor:
        """The tensor, as ``safe_open(...).get_tensor(key)`` returns it (a fresh CPU tensor, writable)."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise AdapterError(f"cannot read {self.path.name} ({e.strerror or type(e).__name__})",
                               adapter=self.adapter) from e
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                raise CorruptAdapterError(f"{self.path.name} changed on disk while it was being read; run again",
                                          adapter=self.adapter)
            view, done = memoryview(buf), 0
            while done < len(buf):
                got = os.preadv(fd, [view[done:]], self.data_start + begin + done)
                if got <= 0:
                    raise self._corrupt(f"ended while tensor {short(key)} was read", TRUNCATED)
                done += got
        except OSError as e:
            raise AdapterError(f"cannot read {self.path.name} ({e.strerror or type(e).__name__})",
                               adapter=self.adapter) from e
        finally:
            os.close(fd)
        return _as_tensor(buf, entry)


def read_all(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file whose bytes are ``raw`` (``name`` in errors), after the checks
    ``SafetensorsFile`` makes of a file on disk; one ``CorruptAdapterError`` line otherwise."""

    def read_at(n: int, at: int) -> bytes:
        return raw[at:at + n]  # _layout checks every length against len(raw) before it reads

    try:
        _, entries, start = _layout(len(raw), read_at)
    except _HeaderError as e:
        what, advice = (*e.args, CORRUPT)[:2]
        raise CorruptAdapterError(one_line(f"{name}: {what}; {advice}", 250)) from e
    return {key: _as_tensor(bytearray(raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]]), e)
            for key, e in entries.items()}


def _layout(size: int, read_at) -> tuple[dict[str, str] | None, dict[str, dict], int]:
    """(metadata, entries, where the data starts) of a ``size``-byte file read through ``read_at(n, offset)``;
    raises _HeaderError on anything safetensors refuses."""
    if size < 8:
        raise _HeaderError(f"is {size} bytes long, too short for a safetensors header", TRUNCATED)
    n = int.from_bytes(read_at(8, 0), "little")
    if n > MAX_HEADER_SIZE:
        raise _HeaderError(f"declares a {n:,}-byte header, over safetensors' limit of {MAX_HEADER_SIZE:,}")
    if 8 + n > size:
        raise _HeaderError(f"declares a {n:,}-byte header but is only {size:,} bytes long", TRUNCATED)
    metadata, entries = parse_header(read_at(n, 8))
    data_len = check_layout(entries)
    actual = size - 8 - n
    if actual < data_len:
        raise _HeaderError(f"has {actual:,} bytes of tensor data where its header lists {data_len:,}", TRUNCATED)
    if actual > data_len:
        raise _HeaderError(f"has {actual - data_len:,} bytes after its last tensor")
    return metadata, entries, 8 + n


def _as_tensor(buf: bytearray, entry: dict) -> torch.Tensor:
    """A tensor's bytes as the tensor (sharing ``buf``, which it then owns)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return raw.view(DTYPES[entry["dtype"]]).reshape(_torch_shape(entry))


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), 1 << 26), offset + len(out))
        if not chunk:
            raise _HeaderError("ended inside its header", TRUNCATED)
        out += chunk
    return bytes(out)


def _torch_shape(entry: dict) -> tuple[int, ...]:
    shape = entry["shape"]
    if entry["dtype"] == "F4":  # torch holds F4 as pairs (float4_e2m1fn_x2): the last dimension halves
        return (*shape[:-1], shape[-1] // 2)
    return tuple(shape)


# -- the header ---------------------------------------------------------------------------------------------
class _HeaderError(Exception):
    """(what is wrong[, advice]) — becomes the file's CorruptAdapterError line."""


class _Obj(dict):
    """A JSON object that remembers all its (key, value) pairs, duplicates included (serde sees every one)."""

    __slots__ = ("pairs",)


def _object(pairs):
    obj = _Obj(pairs)
    obj.pairs = pairs
    return obj


class _Num:
    """A JSON number that is not an unsigned 64-bit integer (negative, -0, fraction, exponent or too large)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _parse_int(text: str):
    if text[0] != "-" and (len(text) < 20 or (len(text) == 20 and int(text) <= _U64)):
        return int(text)
    _check_number(text)
    return _Num(text)


def _parse_float(text: str):
    _check_number(text)
    return _Num(text)


def _parse_constant(text: str):
    raise _HeaderError(f"header holds {text}, which is not JSON")


def _check_number(text: str) -> None:
    if not _serde_f64_in_range(text):
        raise _HeaderError(f"header holds the number {short(text, 40)}, beyond the range safetensors reads")


_POW10 = [float(f"1e{i}") for i in range(309)]


def _serde_f64_in_range(s: str) -> bool:
    """Whether serde_json (without float_roundtrip, as safetensors builds it) reads this JSON number as a finite
    f64 rather than failing with "number out of range": its digit-by-digit significand and power-of-ten product."""
    i, n = (1 if s[0] == "-" else 0), len(s)
    sig, exp = 0, 0

    def overflows(a: int, d: int, limit: int) -> bool:
        return a >= limit // 10 and (a > limit // 10 or d > limit % 10)

    if s[i] == "0":
        i += 1
    else:
        while i < n and s[i].isdigit():
            d = ord(s[i]) - 48
            if overflows(sig, d, _U64):  # further integer digits only scale the significand
                while i < n and s[i].isdigit():
                    exp += 1
                    i += 1
                break
            sig = sig * 10 + d
            i += 1
    if i < n and s[i] == ".":
        i += 1
        while i < n and s[i].isdigit():
            d = ord(s[i]) - 48
            if overflows(sig, d, _U64):  # further fraction digits are dropped
                while i < n and s[i].isdigit():
                    i += 1
                break
            sig = sig * 10 + d
            exp -= 1
            i += 1
    if i < n and s[i] in "eE":
        i += 1
        positive = True
        if s[i] in "+-":
            positive = s[i] == "+"
            i += 1
        e = 0
        while i < n:
            d = ord(s[i]) - 48
            if overflows(e, d, _I32):
                return sig == 0 or not positive
            e = e * 10 + d
            i += 1
        exp = max(-(2**31), min(_I32, exp + e if positive else exp - e))
    f = float(sig)
    while True:
        a = abs(exp) if exp != -(2**31) else len(_POW10)
        if a < len(_POW10):
            if exp >= 0:
                f *= _POW10[a]
                return not math.isinf(f)
            return True
        if f == 0.0:
            return True
        if exp >= 0:
            return False
        f /= 1e308
        exp += 308


_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _kind(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return f"the number {value!r}"


def _check_tree(root, text: str) -> None:
    """serde_json's limits the Python parser lacks: nesting depth, and lone surrogates in \\u escapes."""
    surrogates = _MAYBE_SURROGATE.search(text) is not None
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _HeaderError(f"header nests JSON more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, _Obj):
            for k, v in node.pairs:
                if surrogates:
                    _check_text(k)
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif surrogates and isinstance(v, str):
                    _check_text(v)
        elif isinstance(node, list):
            for v in node:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif surrogates and isinstance(v, str):
                    _check_text(v)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _HeaderError(f"header holds a lone surrogate escape in {short(s, 40)}")


def parse_header(raw: bytes) -> tuple[dict[str, str] | None, dict[str, dict]]:
    """The header bytes -> (metadata, entries); raises _HeaderError on anything safetensors refuses."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _HeaderError(f"header is not valid UTF-8 (byte {e.start})") from e
    if text.startswith("\ufeff"):
        raise _HeaderError("header starts with a byte-order mark")
    try:
        root = json.loads(text, object_pairs_hook=_object, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise _HeaderError(f"header is not valid JSON ({e.msg.removesuffix(' at')} at character {e.pos})") from e
    except RecursionError:
        raise _HeaderError(f"header nests JSON more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(root, _Obj):
        raise _HeaderError(f"header is {_kind(root)}, not a JSON object")
    _check_tree(root, text)
    metadata, seen_metadata, entries = None, False, {}
    for name, value in root.pairs:
        if name == "__metadata__":
            if seen_metadata:
                raise _HeaderError("header has __metadata__ twice")
            seen_metadata = True
            metadata = _metadata(value)
        else:
            entries[name] = _entry(name, value)  # a name given twice: each must be valid, the last counts
    return metadata, entries


def _metadata(value) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, _Obj):
        raise _HeaderError(f"__metadata__ is {_kind(value)}, not a map of strings")
    for k, v in value.pairs:
        if not isinstance(v, str):
            raise _HeaderError(f"__metadata__ entry {short(k, 40)} is {_kind(v)}, not a string")
    return dict(value)


_FIELDS = ("dtype", "shape", "data_offsets")


def _entry(name: str, value) -> dict:
    label = f"tensor {short(name, 60)}"
    if isinstance(value, _Obj):
        fields = {}
        for k, v in value.pairs:
            if k in _FIELDS:
                if k in fields:
                    raise _HeaderError(f"{label} gives {k} twice")
                fields[k] = v
        for k in _FIELDS:
            if k not in fields:
                raise _HeaderError(f"{label} has no {k}")
        dtype, shape, offsets = (fields[k] for k in _FIELDS)
    elif isinstance(value, list):  # serde also reads a struct from a sequence of its fields
        if len(value) != 3:
            raise _HeaderError(f"{label} is a list of {len(value)} items, not [dtype, shape, data_offsets]")
        dtype, shape, offsets = value
    else:
        raise _HeaderError(f"{label} is {_kind(value)}, not an object")
    if isinstance(dtype, _Obj) and len(dtype.pairs) == 1 and dtype.pairs[0][1] is None:
        dtype = dtype.pairs[0][0]  # serde's map spelling of a unit enum variant: {"F32": null}
    if not isinstance(dtype, str) or dtype not in BITS:
        raise _HeaderError(f"{label} has unknown dtype {short(dtype, 30)}")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise _HeaderError(f"{label} has shape {short(shape, 40)}; it must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _HeaderError(f"{label} has data_offsets {short(offsets, 40)}; they must be two non-negative integers")
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (offsets[0], offsets[1])}


def check_layout(entries: dict[str, dict]) -> int:
    """The tensors must tile the data section in offset order; returns its length. Then what torch must hold."""
    start, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"]):
        label = f"tensor {short(name, 60)}"
        begin, end = entry["data_offsets"]
        if end < begin:
            raise _HeaderError(f"{label} ends (byte {end}) before it begins (byte {begin})")
        if begin != start:
            if begin < start:
                raise _HeaderError(f"{label} overlaps {short(previous, 60)} (bytes {begin}–{start})")
            raise _HeaderError(f"{label} starts at byte {begin} but the tensor before it ends at byte {start} (a gap)")
        start, previous = end, name
        numel = 1
        for d in entry["shape"]:
            numel *= d
            if numel > _U64:
                raise _HeaderError(f"{label} has shape {short(list(entry['shape']), 60)}, too large to address")
        bits = numel * BITS[entry["dtype"]]
        if bits > _U64:
            raise _HeaderError(f"{label} has shape {short(list(entry['shape']), 60)}, too large to address")
        if bits % 8:
            raise _HeaderError(f"{label} ({entry['dtype']}, shape {short(list(entry['shape']), 40)}) "
                               "does not fill whole bytes")
        if end - begin != bits // 8:
            raise _HeaderError(f"{label} holds {end - begin:,} bytes but its dtype {entry['dtype']} and shape "
                               f"{short(list(entry['shape']), 40)} need {bits // 8:,}")
    for name, entry in entries.items():
        label = f"tensor {short(name, 60)}"
        dtype, shape = entry["dtype"], entry["shape"]
        if DTYPES[dtype] is None:
            raise _HeaderError(f"{label} has dtype {dtype}, which torch cannot hold")
        if any(d > _I64 for d in shape):
            raise _HeaderError(f"{label} has a dimension of 2^63 or more, which torch cannot hold")
        if dtype == "F4" and shape[-1] % 2:
            raise _HeaderError(f"{label} is F4 with an odd last dimension {shape[-1]}; torch holds F4 in pairs")
        if entry["data_offsets"][0] == entry["data_offsets"][1]:  # empty: torch may still refuse the shape
            try:
                torch.empty(0, dtype=torch.uint8).view(DTYPES[dtype]).reshape(_torch_shape(entry))
            except (RuntimeError, ValueError, TypeError, OverflowError):
                raise _HeaderError(f"{label} has shape {short(list(shape), 60)}, which torch cannot hold")
    return start


# -- writing ------------------------------------------------------------------------------------------------
def encode_header(entries: dict[str, dict], metadata: dict[str, str], size: int | None = None) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file, padded with spaces to ``size`` bytes
    (default: to the next multiple of 8, as safetensors itself writes it)."""
    body = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    size = len(body) + -len(body) % 8 if size is None else size
    if len(body) > size:  # more tensors than announced: never silently corrupt
        raise RuntimeError("safetensors header overflow")
    return size.to_bytes(8, "little") + body.ljust(size)


def write_tensor(file, tensor: torch.Tensor) -> int:
    """Append ``tensor``'s bytes (row-major, as safetensors stores them) to the binary ``file``; returns how many."""
    data = tensor.detach().to("cpu").contiguous()
    if not data.numel():
        return 0
    raw = memoryview(data.reshape(-1).view(torch.uint8).numpy())
    file.write(raw)
    return raw.nbytes


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, without holding them all in memory.

    The header (8-byte little-endian length + JSON) comes first in the format, so space for it is
    reserved up front from the known tensor names and filled in at close; safetensors allows the
    header to be padded with spaces.
    """

    PER_TENSOR = 192  # generous bound on one header entry besides its name (dtype, 4-d shape, offsets)

    def __init__(self, path: Path, names: list[str], metadata: dict[str, str] | None = None):
        self.metadata = metadata or {"format": "pt"}
        reserve = sum(len(json.dumps(n)) + self.PER_TENSOR for n in names) + len(json.dumps(self.metadata)) + 64
        self.header_size = (reserve + 7) // 8 * 8
        self.file = open(path, "wb")
        self.file.seek(8 + self.header_size)
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = write_tensor(self.file, tensor)
        self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + n]}
        self.offset += n

    def close(self) -> None:
        header = encode_header(self.entries, self.metadata, self.header_size)
        self.file.seek(0)
        self.file.write(header)
        self.file.close()

    def discard(self) -> None:
        self.file.close()
