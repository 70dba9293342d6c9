"""Hostile input files: one typed error line each, never a traceback, never a wrong reading.

* safetensors headers: our validating reader (safetensors_io.SafetensorsFile) must accept and refuse exactly what
  ``safetensors.safe_open(path, framework="pt")`` + ``get_tensor`` of every key accepts and refuses, and read the
  same tensors bit for bit;
* adapter_config.json: AdapterSource.open raises the right error subclass with one short line, fast;
* rank_pattern / alpha_pattern keys: re2 matching equals ``peft.utils.other.get_pattern_key``.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import write_adapter
from lowrank_methods.formats.peft_config import MAX_PATTERN_ENTRIES, PatternTable, compile_pattern_key
from lowrank_methods.core.errors import (MAX_MESSAGE, AdapterError, CorruptAdapterError, MergeError,
                                    UnsupportedAdapterError)
from lowrank_methods.formats.peft import AdapterSource
from lowrank_methods.formats.safetensors_io import SafetensorsFile

Q = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q}.lora_A.weight"
KEY_B = f"base_model.model.{Q}.lora_B.weight"


# -- helpers --------------------------------------------------------------------------------------------
def st_bytes(header, data: bytes = b"", *, n: int | None = None, pad: bytes = b"") -> bytes:
    """A safetensors file from a header (dict -> JSON, str/bytes as given), its data and an optional length."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    header += pad
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def E(dtype, shape, offsets) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def theirs(path) -> dict | None:
    """safetensors' own verdict: every tensor, or None when it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def ours(path) -> dict | None:
    """Our verdict: every tensor, or None after a one-line CorruptAdapterError (anything else is a bug)."""
    try:
        f = SafetensorsFile(path)
        return {k: f.read(k) for k in f.entries}
    except CorruptAdapterError as e:
        assert_one_line(e)
        return None


def assert_one_line(e: BaseException) -> str:
    line = str(e)
    assert isinstance(e, MergeError), repr(e)
    assert "\n" not in line and "\r" not in line and len(line) <= MAX_MESSAGE, line
    assert "Traceback" not in line
    return line


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def assert_same_verdict(path):
    mine, ref = ours(path), theirs(path)
    assert (mine is None) == (ref is None), f"ours {'refuses' if mine is None else 'accepts'}, safetensors " \
                                            f"{'refuses' if ref is None else 'accepts'}"
    if ref is not None:
        assert mine.keys() == ref.keys()
        for k in ref:
            assert mine[k].dtype == ref[k].dtype and mine[k].shape == ref[k].shape, k
            assert raw_bytes(mine[k]) == raw_bytes(ref[k]), k
    return ref is not None


F4 = b"\0" * 4
OK1 = {"x": E("F32", [1], [0, 4])}

# (id, file bytes, does safetensors 0.8 accept it?) — the behaviours found by experiment, each one a case.
HEADER_CASES = [
    # sizes
    ("empty-object", st_bytes("{}"), True),
    ("too-short-file", b"\x02\0\0\0", False),
    ("header-length-zero", st_bytes(b""), False),
    ("header-over-100MB", st_bytes("{}", n=100_000_001), False),
    ("header-length-u64-max", st_bytes("{}", n=2**64 - 1), False),
    ("header-past-end", st_bytes("{}", n=10), False),
    # JSON text
    ("leading-whitespace", st_bytes(" \n{}"), True),
    ("trailing-space-padding", st_bytes(OK1, F4, pad=b"        "), True),
    ("trailing-tab-newline-padding", st_bytes("{}", pad=b"\t\r\n "), True),
    ("trailing-nul-padding", st_bytes("{}", pad=b"\0\0"), False),
    ("trailing-garbage", st_bytes("{}x"), False),
    ("byte-order-mark", st_bytes(b"\xef\xbb\xbf{}"), False),
    ("invalid-utf8", st_bytes(b'{"\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("control-char-in-name", st_bytes(b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("lone-surrogate-name", st_bytes('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("surrogate-pair-name", st_bytes('{"\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), True),
    ("empty-name", st_bytes({"": E("F32", [1], [0, 4])}, F4), True),
    ("header-is-list", st_bytes("[]"), False),
    ("header-is-null", st_bytes("null"), False),
    ("trailing-comma", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}', F4), False),
    ("nan-literal", st_bytes('{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', F4), False),
    ("depth-127-ok", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":' + "[" * 125 + "]" * 125 + "}}", F4), True),
    ("depth-128-refused", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":' + "[" * 126 + "]" * 126 + "}}", F4), False),
    ("depth-5000-refused", st_bytes('{"x":' + "[" * 5000 + "]" * 5000 + "}"), False),
    ("extra-number-1e308-ok", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":1e308}}', F4), True),
    ("extra-number-1e400-refused", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":1e400}}', F4), False),
    ("extra-number-near-f64-max-refused",  # serde_json's fast float path overflows where Python rounds to max
     st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":1.7976931348623158e308}}', F4), False),
    ("extra-5000-digit-int-refused", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":' + "9" * 5000 + "}}", F4), False),
    ("extra-300-digit-int-ok", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"e":' + "9" * 300 + "}}", F4), True),
    # entries
    ("scalar", st_bytes({"x": E("F32", [], [0, 4])}, F4), True),
    ("zero-length-tensor", st_bytes({"x": E("F32", [0, 3], [0, 0])}), True),
    ("two-zero-length-at-same-offset", st_bytes({"x": E("F32", [0], [0, 0]), "y": E("BF16", [0], [0, 0])}), True),
    ("zero-length-between", st_bytes({"a": E("F32", [1], [0, 4]), "x": E("F32", [0], [4, 4]), "b": E("F32", [1], [4, 8])}, F4 * 2), True),
    ("zero-length-past-end", st_bytes({"x": E("F32", [0], [4, 4])}, F4), False),
    ("metadata", st_bytes({"__metadata__": {"format": "pt"}, **OK1}, F4), True),
    ("metadata-null", st_bytes('{"__metadata__":null}'), True),
    ("metadata-non-string", st_bytes('{"__metadata__":{"a":1}}'), False),
    ("metadata-list", st_bytes('{"__metadata__":[]}'), False),
    ("metadata-twice", st_bytes('{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}'), False),
    ("metadata-key-twice", st_bytes('{"__metadata__":{"a":"b","a":"c"}}'), True),
    ("unknown-extra-field", st_bytes({"x": {**E("F32", [1], [0, 4]), "foo": [1, {"bar": None}]}}, F4), True),
    ("field-twice", st_bytes('{"x":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("missing-dtype", st_bytes({"x": {"shape": [1], "data_offsets": [0, 4]}}, F4), False),
    ("entry-null", st_bytes('{"x":null}'), False),
    ("entry-as-list", st_bytes('{"x":["F32",[1],[0,4]]}', F4), True),
    ("entry-as-short-list", st_bytes('{"x":["F32",[1]]}', F4), False),
    ("dtype-as-unit-map", st_bytes('{"x":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', F4), True),
    ("dtype-as-map-with-value", st_bytes('{"x":{"dtype":{"F32":1},"shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("unknown-dtype", st_bytes({"x": E("F33", [1], [0, 4])}, F4), False),
    ("lowercase-dtype", st_bytes({"x": E("f32", [1], [0, 4])}, F4), False),
    ("name-twice-last-wins", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                      '"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F4 * 2), True),
    ("name-twice-first-invalid", st_bytes('{"x":{"dtype":"BOGUS","shape":[1],"data_offsets":[0,4]},'
                                          '"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4), False),
    ("negative-dim", st_bytes({"x": E("F32", [-1], [0, 4])}, F4), False),
    ("float-dim", st_bytes({"x": E("F32", [1.0], [0, 4])}, F4), False),
    ("exponent-dim", st_bytes('{"x":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', F4), False),
    ("minus-zero-dim", st_bytes('{"x":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'), False),
    ("bool-dim", st_bytes({"x": E("F32", [True], [0, 4])}, F4), False),
    ("string-dim", st_bytes({"x": E("F32", ["1"], [0, 4])}, F4), False),
    ("shape-null", st_bytes({"x": E("F32", None, [0, 4])}, F4), False),
    ("float-offset", st_bytes('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', F4), False),
    ("three-offsets", st_bytes({"x": E("F32", [1], [0, 4, 4])}, F4), False),
    # layout
    ("gap", st_bytes({"x": E("F32", [1], [4, 8])}, F4 * 2), False),
    ("overlap", st_bytes({"x": E("F32", [2], [0, 8]), "y": E("F32", [1], [4, 8])}, F4 * 2), False),
    ("ends-before-begins", st_bytes({"x": E("F32", [0], [4, 0])}, F4), False),
    ("size-mismatch", st_bytes({"x": E("F32", [2], [0, 4])}, F4), False),
    ("truncated-data", st_bytes(OK1, b"\0" * 3), False),
    ("trailing-data", st_bytes(OK1, b"\0" * 5), False),
    ("numel-overflow", st_bytes({"x": E("F32", [2**32, 2**32], [0, 0])}), False),
    ("numel-overflow-before-zero", st_bytes({"x": E("U8", [2**62, 4, 0], [0, 0])}), False),
    ("zero-first-no-overflow", st_bytes({"x": E("U8", [0, 2**62, 2**62], [0, 0])}), True),
    ("bits-overflow", st_bytes({"x": E("F32", [2**61], [0, 0])}), False),
    ("dim-2^63-1-empty", st_bytes({"x": E("F32", [2**63 - 1, 0], [0, 0])}), True),
    ("dim-2^63-torch-refuses", st_bytes({"x": E("F32", [2**63, 0], [0, 0])}), False),
    ("dim-over-u64", st_bytes({"x": E("F32", [2**64], [0, 0])}), False),
    # dtypes
    ("bool", st_bytes({"x": E("BOOL", [2], [0, 2])}, b"\x01\x00"), True),
    ("u16-u32-u64", st_bytes({"a": E("U16", [1], [0, 2]), "b": E("U32", [1], [2, 6]), "c": E("U64", [1], [6, 14])}, bytes(range(14))), True),
    ("f8-e4m3-e5m2-e8m0", st_bytes({"a": E("F8_E4M3", [2], [0, 2]), "b": E("F8_E5M2", [2], [2, 4]), "c": E("F8_E8M0", [2], [4, 6])}, bytes(range(6))), True),
    ("f8-fnuz", st_bytes({"a": E("F8_E4M3FNUZ", [2], [0, 2]), "b": E("F8_E5M2FNUZ", [2], [2, 4])}, bytes(range(4))), True),
    ("c64", st_bytes({"x": E("C64", [1], [0, 8])}, bytes(8)), True),
    ("f4-pairs", st_bytes({"x": E("F4", [2, 4], [0, 4])}, bytes(range(4))), True),
    ("f4-odd-last-dim", st_bytes({"x": E("F4", [2, 3], [0, 3])}, bytes(3)), False),
    ("f4-scalar-half-byte", st_bytes({"x": E("F4", [], [0, 0])}), False),
    ("f6-no-torch-dtype", st_bytes({"x": E("F6_E2M3", [4], [0, 3])}, bytes(3)), False),
    ("f6-empty-no-torch-dtype", st_bytes({"x": E("F6_E3M2", [0], [0, 0])}), False),
]


@pytest.mark.parametrize("blob,accepted", [pytest.param(b, ok, id=i) for i, b, ok in HEADER_CASES])
def test_header_verdict_equals_safetensors(tmp_path, blob, accepted):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(blob)
    assert assert_same_verdict(path) is accepted


def test_safetensors_differential_fuzz(tmp_path):
    """Seeded random headers (right and wrong offsets, shapes, dtypes, forms, duplicates): same verdict."""
    rng = random.Random(1234)
    dtypes = {"F32": 32, "F16": 16, "BF16": 16, "U8": 8, "BOOL": 8, "F4": 4, "F6_E2M3": 6, "C64": 64, "I64": 64,
              "F8_E8M0": 8, "X": 8}
    odd = [0, 1, 3, 8, -1, 1.0, True, None, "1", [], {}, 2**63, 2**64 - 1, 2**64]
    accepted = 0
    path = tmp_path / "f.safetensors"
    for _ in range(250):
        items, pos = [], 0
        for i in range(rng.randint(0, 4)):
            dt = rng.choice(list(dtypes))
            shape = [rng.choice([0, 1, 2, 3, 4]) for _ in range(rng.randint(0, 3))]
            numel = 1
            for d in shape:
                numel *= d
            off = [pos, pos + numel * dtypes[dt] // 8]
            r = rng.random()
            if r < 0.08 and shape:
                shape[rng.randrange(len(shape))] = rng.choice(odd)
            elif r < 0.16:
                off[rng.randrange(2)] += rng.choice([-4, -1, 1, 4])
            elif r < 0.2:
                off = [rng.choice(odd), rng.choice(odd)]
            if type(off[1]) is int and 0 <= off[1] < 10**6:
                pos = max(pos, off[1])
            name = rng.choice(["a", "b", "a", "__metadata__", ""]) if rng.random() < 0.3 else f"t{i}"
            form = rng.random()
            entry = (E(dt, shape, off) if form < 0.8 else [dt, shape, off] if form < 0.9
                     else {"dtype": {dt: None}, "shape": shape, "data_offsets": off, "extra": [1]})
            items.append(f"{json.dumps(name)}:{json.dumps(entry)}")
        if rng.random() < 0.3:
            items.append('"__metadata__":' + json.dumps(rng.choice([{"a": "b"}, None, {"a": 1}, []])))
        rng.shuffle(items)
        size = max(pos + rng.choice([0, 0, 0, 1, -1]), 0)
        path.write_bytes(st_bytes("{" + ",".join(items) + "}", bytes(i % 251 for i in range(size)),
                                  pad=b" " * rng.choice([0, 3])))
        accepted += assert_same_verdict(path)
    assert 30 < accepted < 220  # both verdicts well represented


def test_zero_length_and_scalar_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5), "m": torch.arange(6.0).reshape(2, 3)}, str(path))
    f = SafetensorsFile(path)
    assert f.read("empty").shape == (0, 5) and f.shape("empty") == (0, 5)
    assert f.read("scalar").shape == () and f.read("scalar").item() == 2.5
    assert torch.equal(f.read("m"), torch.arange(6.0).reshape(2, 3))
    assert f.dtype("m") == torch.float32 and f.metadata is None


def test_file_changed_after_open_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"m": torch.ones(4)}, str(path))
    f = SafetensorsFile(path)
    save_file({"m": torch.zeros(4)}, str(path))
    os.utime(path, ns=(1, 1))
    with pytest.raises(CorruptAdapterError, match="changed on disk"):
        f.read("m")


@pytest.mark.parametrize("cut", [4, 40])
def test_truncated_adapter_file_is_one_line(tmp_path, cut):
    d = write_adapter(tmp_path / "a", {Q: (8, 8)})
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) - cut])
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d)
    line = assert_one_line(e.value)
    assert "adapter_model.safetensors" in line and "truncated" in line and "'a'" in line


def test_overlapping_adapter_tensors_name_both(tmp_path):
    d = write_adapter(tmp_path / "a", {Q: (2, 2)}, r=1)
    header = {KEY_A: E("F32", [1, 2], [0, 8]), KEY_B: E("F32", [2, 1], [4, 12])}
    (d / "adapter_model.safetensors").write_bytes(st_bytes(header, bytes(12)))
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d)
    line = assert_one_line(e.value)
    assert "overlaps" in line and "lora_A" in line and "lora_B" in line


# -- LoRA tensors ----------------------------------------------------------------------------------------
def _with_tensors(tmp_path, tensors, **kw):
    d = write_adapter(tmp_path / "a", {Q: (8, 8)}, **kw)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize("a,b", [
    (torch.tensor(1.0), torch.tensor(1.0)),        # scalars
    (torch.ones(4), torch.ones(4)),                 # 1-D
    (torch.ones(4, 8), torch.ones(8, 4, 1, 1)),     # linear A with a convolution's B
])
def test_lora_tensors_that_are_not_matrices(tmp_path, a, b):
    with pytest.raises(CorruptAdapterError) as e:  # refused at open, from the header: nothing is read
        AdapterSource.open(_with_tensors(tmp_path, {KEY_A: a, KEY_B: b}))
    line = assert_one_line(e.value)
    assert "matrices" in line and Q in line


def test_two_tensors_for_one_factor_are_refused(tmp_path):
    d = _with_tensors(tmp_path, {KEY_A: torch.ones(4, 8), KEY_B: torch.ones(8, 4),
                                 f"base_model.model.{Q}.lora_A.default.weight": torch.zeros(4, 8)})
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d)
    assert "two lora_A tensors" in assert_one_line(e.value)


def test_integer_lora_tensors_are_unsupported(tmp_path):
    with pytest.raises(UnsupportedAdapterError) as e:
        AdapterSource.open(_with_tensors(tmp_path, {KEY_A: torch.ones(4, 8, dtype=torch.int8),
                                                    KEY_B: torch.ones(8, 4, dtype=torch.int8)}))
    assert "lora_A is stored as I8" in assert_one_line(e.value)


def test_convolution_lora_reads(tmp_path):
    a, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(6, 4, 1, 1, dtype=torch.float64)
    src = AdapterSource.open(_with_tensors(tmp_path, {KEY_A: a, KEY_B: b}, r=4, alpha=8))
    layout = src.layout(Q)
    assert layout.kind == "conv" and layout.shape == (6, 27) and layout.kernel == (3, 3)
    assert torch.allclose(src.read_module(Q, dtype=torch.float64).dense(), 2.0 * b.flatten(1) @ a.flatten(1))
    bad = _with_tensors(tmp_path / "k", {KEY_A: a, KEY_B: torch.randn(6, 4, 3, 3, dtype=torch.float64)}, r=4)
    with pytest.raises(CorruptAdapterError, match="expected 1s"):
        AdapterSource.open(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_factors_name_adapter_and_module(tmp_path, value):
    d = write_adapter(tmp_path / "bad", {Q: (8, 8)})
    t = load_file(str(d / "adapter_model.safetensors"))
    t[KEY_A][1, 2] = value
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d).read_module(Q)
    line = assert_one_line(e.value)
    assert "'bad'" in line and Q in line and "NaN or Inf" in line


def test_good_adapter_reads_as_before(tmp_path):
    d = write_adapter(tmp_path / "a", {Q: (6, 5)}, r=3, alpha=12, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4})
    src = AdapterSource.open(d)
    assert src.rank_alpha(Q) == (2, 4.0) and src.scale(Q) == 2.0
    f = src.read_module(Q, dtype=torch.float64)
    t = load_file(str(d / "adapter_model.safetensors"))
    assert torch.allclose(f.dense(), 2.0 * t[KEY_B].double() @ t[KEY_A].double())
    assert src.config["rank_pattern"] == {"q_proj": 2} and src.settings.r == 3


# -- pickles ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _pickled(tmp_path, obj):
    d = write_adapter(tmp_path / "p", {Q: (8, 8)})
    (d / "adapter_model.safetensors").unlink()
    torch.save(obj, d / "adapter_model.bin")
    return d


def test_pickle_needs_the_flag_and_never_names_it(tmp_path):
    d = _pickled(tmp_path, {KEY_A: torch.ones(4, 8), KEY_B: torch.ones(8, 4)})
    with pytest.raises(AdapterError) as e:
        AdapterSource.open(d)
    err = e.value
    assert err.message == "adapter_model.bin is a pickle file; convert it to safetensors"
    assert err.flag == "--allow-pickle" and err.flag_hint == "pass --allow-pickle to load it with weights_only=True"
    assert "--" not in str(err)
    assert err.line({"--allow-pickle"}).endswith("pass --allow-pickle to load it with weights_only=True")
    src = AdapterSource.open(d, allow_pickle=True)
    assert src.layout(Q).shape == (8, 8) and src.dtype == torch.float32


def test_malicious_pickle_is_one_short_line(tmp_path):
    d = _pickled(tmp_path, {KEY_A: _Evil()})
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d, allow_pickle=True)
    assert e.value.message == "adapter_model.bin holds objects other than tensors; it was not loaded (weights_only)"
    line = assert_one_line(e.value)
    assert "corrupt or truncated" not in line and "torch.load" not in line and "PyTorch 2.6" not in line


@pytest.mark.parametrize("obj,needle", [
    ([1, 2, 3], "list, not a dict"),
    ({KEY_A: 1, KEY_B: torch.ones(8, 4)}, "int under"),
    ({KEY_A: torch.ones(4, 8).to_sparse(), KEY_B: torch.ones(8, 4)}, "only dense"),
])
def test_pickle_with_wrong_contents(tmp_path, obj, needle):
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(_pickled(tmp_path, obj), allow_pickle=True)
    assert needle in assert_one_line(e.value)


def test_truncated_pickle(tmp_path):
    d = _pickled(tmp_path, {KEY_A: torch.ones(4, 8), KEY_B: torch.ones(8, 4)})
    data = (d / "adapter_model.bin").read_bytes()
    (d / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d, allow_pickle=True)
    assert "corrupt or truncated" in assert_one_line(e.value)


# -- adapter_config.json -----------------------------------------------------------------------------------
BASE_CONFIG = '"peft_type": "LORA", "base_model_name_or_path": "org/tiny-base", "task_type": "CAUSAL_LM"'


def _cfg(body: str) -> bytes:
    return ("{" + BASE_CONFIG + (", " + body if body else "") + "}").encode()


HUGE_PATTERN = "{" + ", ".join(f'"model\\\\.layers\\\\.{i}\\\\.q_proj": 4' for i in range(100_000)) + "}"

CONFIG_CASES = [
    ("r-string", _cfg('"r": "8"'), CorruptAdapterError, "r: Input should be a valid integer"),
    ("r-float", _cfg('"r": 4.7'), CorruptAdapterError, "r: Input should be a valid integer"),
    ("r-integral-float", _cfg('"r": 4.0'), CorruptAdapterError, "r: Input should be a valid integer"),
    ("r-zero", _cfg('"r": 0'), CorruptAdapterError, "r: Input should be greater than or equal to 1"),
    ("r-negative", _cfg('"r": -4'), CorruptAdapterError, "r: Input should be greater than or equal to 1"),
    ("r-bool", _cfg('"r": true'), CorruptAdapterError, "r: Input should be a valid integer"),
    ("r-null", _cfg('"r": null'), CorruptAdapterError, "r: Input should be a valid integer"),
    ("r-huge", _cfg('"r": 1' + "0" * 40), CorruptAdapterError, "r: Input should be less than or equal to"),
    ("list-config", b"[]", CorruptAdapterError, "holds a JSON list, not an object"),
    ("null-config", b"null", CorruptAdapterError, "holds a JSON null, not an object"),
    ("not-utf8", _cfg('"r": 4, "note": "caf\xe9"').replace(b"\xc3\xa9", b"\xe9"), CorruptAdapterError, "is not UTF-8 text"),
    ("not-json", b'{"peft_type": "LORA", "r": 4,', CorruptAdapterError, "is not valid JSON"),
    ("empty-file", b"", CorruptAdapterError, "is not valid JSON"),
    ("deep-json", b"[" * 100_000 + b"]" * 100_000, CorruptAdapterError, "nests JSON too deeply"),
    ("5000-digit-number", _cfg('"seed": ' + "7" * 5000), CorruptAdapterError, "a number with 5000 digits"),
    ("alpha-nan", _cfg('"r": 4, "lora_alpha": NaN'), CorruptAdapterError, "lora_alpha: Input should be a finite number"),
    ("alpha-infinity", _cfg('"r": 4, "lora_alpha": Infinity'), CorruptAdapterError, "lora_alpha: Input should be a finite number"),
    ("alpha-1e308", _cfg('"r": 4, "lora_alpha": 1e308'), CorruptAdapterError, "lora_alpha: Input should be less than or equal to 1000000"),
    ("alpha-string", _cfg('"r": 4, "lora_alpha": "16"'), CorruptAdapterError, "lora_alpha: Input should be a valid number"),
    ("alpha-bool", _cfg('"r": 4, "lora_alpha": true'), CorruptAdapterError, "lora_alpha: Input should be a valid number"),
    ("alpha-pattern-minus-inf", _cfg('"r": 4, "alpha_pattern": {"q_proj": -Infinity}'), CorruptAdapterError,
     "alpha_pattern.q_proj: Input should be a finite number"),
    ("rank-pattern-list-value", _cfg('"r": 4, "rank_pattern": {"q_proj": [4]}'), CorruptAdapterError,
     "rank_pattern.q_proj: Input should be a valid integer"),
    ("rank-pattern-zero", _cfg('"r": 4, "rank_pattern": {"q_proj": 0}'), CorruptAdapterError,
     "rank_pattern.q_proj: Input should be greater than or equal to 1"),
    ("rank-pattern-is-list", _cfg('"r": 4, "rank_pattern": [["q_proj", 4]]'), CorruptAdapterError,
     "rank_pattern: Input should be a valid dictionary"),
    ("rslora-string", _cfg('"r": 4, "use_rslora": "yes"'), CorruptAdapterError, "use_rslora: Input should be a valid boolean"),
    ("fan-in-fan-out-int", _cfg('"r": 4, "fan_in_fan_out": 1'), CorruptAdapterError, "fan_in_fan_out: Input should be a valid boolean"),
    ("bad-regex-key", _cfg('"r": 4, "rank_pattern": {"q_proj[": 4}'), CorruptAdapterError, "is not a valid regular expression"),
    ("backreference-key", _cfg(r'"r": 4, "rank_pattern": {"(q)\\1_proj": 4}'), CorruptAdapterError, "backreference"),
    ("lookahead-key", _cfg('"r": 4, "alpha_pattern": {"q(?=_proj)": 4}'), CorruptAdapterError, "lookahead or lookbehind"),
    ("possessive-key", _cfg('"r": 4, "rank_pattern": {"q_pro++j": 4}'), CorruptAdapterError, "possessive"),
    ("global-flag-mid-pattern", _cfg('"r": 4, "rank_pattern": {"(?i)q_proj": 4}'), CorruptAdapterError,
     "global flags not at the start"),
    ("python-only-repeat", _cfg('"r": 4, "rank_pattern": {"q{1001}": 4}'), CorruptAdapterError, "too complex"),
    ("re2-only-syntax", _cfg(r'"r": 4, "rank_pattern": {"\\p{L}_proj": 4}'), CorruptAdapterError, "bad escape"),
    ("huge-rank-pattern", _cfg('"r": 4, "rank_pattern": ' + HUGE_PATTERN), CorruptAdapterError,
     "rank_pattern has 100,000 entries; at most 10,000"),
    ("peft-type-ia3", b'{"peft_type": "IA3", "r": 4}', UnsupportedAdapterError, "peft_type is 'IA3'; only LORA"),
    ("peft-type-missing", b'{"r": 4}', UnsupportedAdapterError, "peft_type is None; only LORA"),
    ("peft-type-number", b'{"peft_type": 5, "r": 4}', UnsupportedAdapterError, "peft_type is 5"),
    ("dora", _cfg('"r": 4, "use_dora": true'), UnsupportedAdapterError, "DoRA"),
    ("lora-bias", _cfg('"r": 4, "lora_bias": true'), UnsupportedAdapterError, "lora_bias"),
    ("pissa-init", _cfg('"r": 4, "init_lora_weights": "pissa_niter_4"'), UnsupportedAdapterError, "also changes the base weights"),
    ("lora-ga-init", _cfg('"r": 4, "init_lora_weights": "lora_ga"'), UnsupportedAdapterError, "also changes the base weights"),
]


@pytest.mark.parametrize("raw,kind,needle", [pytest.param(r, k, n, id=i) for i, r, k, n in CONFIG_CASES])
def test_hostile_config_is_one_line(tmp_path, raw, kind, needle):
    d = write_adapter(tmp_path / "bad", {Q: (8, 8)}, r=4)
    (d / "adapter_config.json").write_bytes(raw)
    start = time.perf_counter()
    with pytest.raises(MergeError) as e:
        AdapterSource.open(d)
    elapsed = time.perf_counter() - start
    assert type(e.value) is kind, repr(e.value)
    line = assert_one_line(e.value)
    assert needle in line and line.startswith("adapter 'bad': "), line
    assert elapsed < 0.5, elapsed


def test_r_zero_with_rank_zero_tensors_is_refused(tmp_path):
    d = write_adapter(tmp_path / "zero", {Q: (8, 8)}, r=0, alpha=8)
    with pytest.raises(CorruptAdapterError) as e:
        AdapterSource.open(d)
    assert "r: Input should be greater than or equal to 1" in assert_one_line(e.value)


def test_config_with_byte_order_mark_and_peft_extras_is_read(tmp_path):
    d = write_adapter(tmp_path / "a", {Q: (8, 8)}, r=4, alpha=16, extra_config={"lora_dropout": 0.05, "megatron_config": None})
    (d / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + (d / "adapter_config.json").read_bytes())
    src = AdapterSource.open(d)
    assert src.scale(Q) == 4.0 and src.config["lora_dropout"] == 0.05 and src.settings.lora_alpha == 16


def test_pattern_at_the_entry_limit_is_read(tmp_path):
    pattern = {f"model\\.layers\\.{i}\\.self_attn\\.q_proj": 4 for i in range(1, MAX_PATTERN_ENTRIES)}
    pattern["model.layers.0.self_attn.q_proj"] = 2  # a dotted key (each "." any character), last in order
    d = write_adapter(tmp_path / "a", {Q: (8, 8)}, r=4, rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = pattern
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    src = AdapterSource.open(d)
    assert src.rank_alpha(Q)[0] == 2 and src.layout(Q).shape == (8, 8)
    assert time.perf_counter() - start < 5


# -- pattern matching parity with PEFT ----------------------------------------------------------------------
def _exact_pattern(module: str) -> str:
    try:
        from lowrank_methods.formats.peft_config import exact_pattern as exact
    except (ImportError, AttributeError):  # the writer's form, should it move
        return re.escape(module) if not re.fullmatch(r"[\w.]+", module) else module.replace(".", r"\.")
    return exact(module)


MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.10.self_attn.v_proj",
    "model.layers.12.mlp.up_proj", "model.layers.3.mlp.down_proj", "model.layers.0.mlp.gate_proj",
    "model.layers.0.self_attn.o_proj", "model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn",
    "model.layers.0.self_attn.Q_proj", "encoder.block.0.layer.0.SelfAttention.q", "x.v_proooj", "a.[[:alpha:]]",
    "unet.down_blocks.0.attentions.0.to_q", "layers.1.q", "q_proj", "a.\x0b", "a.\x1c", "model-1.q+proj",
]
PATTERN_KEYS = [
    "q_proj", "k_proj", "model.layers.0.self_attn.q_proj", "layers.1.", *map(_exact_pattern, MODULES[:8]),
    _exact_pattern("model-1.q+proj"), r"layers\.\d+\.mlp\.(up|down)_proj", r"layers\.[0-9]{1,2}\.self_attn\..*",
    "o_proj|gate_proj", "[qkv]_proj", r"(?i:q_PROJ)", r"\w+_proj\b", "lm_head$", "^lm_head", r"(?s:.)*embed_tokens",
    "v_pro{,3}j", "[[:alpha:]]", r"\s", r"[^\W\d]_proj", "", ")|(", "a)|(b", r"c_att[^x]", r"(?a:\w)+\.q", r"\d{2}",
    r"attentions\.\d\.to_[qkv]", r"h\.\d+\.attn\.c_attn", "(a+)+b",
]


def _peft_get_pattern_key():
    """PEFT's own ``peft.utils.other.get_pattern_key``, taken from its source file: importing peft costs seconds."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("peft")
    source = (Path(spec.origin).parent / "utils" / "other.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_pattern_key":
            namespace = {"re": re, "Sequence": list}
            exec(compile(ast.Module([node], []), "peft/utils/other.py", "exec"), namespace)
            return namespace["get_pattern_key"]
    from peft.utils.other import get_pattern_key

    return get_pattern_key


get_pattern_key = _peft_get_pattern_key()


def _peft_value(pattern: dict, module: str, default):
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def test_pattern_keys_match_exactly_like_peft():
    import warnings

    for key in PATTERN_KEYS:
        table = PatternTable("rank_pattern", {key: 2})
        for module in MODULES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Python warns about "[[" (a literal "[" to it)
                expected = get_pattern_key([key], module) == key
            assert (table.index(module) == 0) == expected, (key, module)
    rng = random.Random(7)
    for _ in range(300):  # dict order decides: the first matching key wins, like PEFT
        pattern = {k: rng.randint(1, 64) for k in rng.sample(PATTERN_KEYS, rng.randint(1, 8))}
        table = PatternTable("rank_pattern", pattern)
        for module in MODULES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert table.lookup(module, 8) == _peft_value(pattern, module, 8), (pattern, module)


def test_module_names_the_matcher_cannot_take():
    table = PatternTable("rank_pattern", {r"\Bq": 2})
    for module in ("", "a.q\nb"):  # never produced by LORA_KEY; Python's \B and $ read them apart from re2
        with pytest.raises(AdapterError) as e:
            table.lookup(module, 8)
        assert_one_line(e.value)


def test_writer_patterns_pick_out_one_module_each():
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "k_proj", "v_proj")]
    pattern = {_exact_pattern(m): i + 1 for i, m in enumerate(modules)}
    table = PatternTable("rank_pattern", pattern)
    for i, m in enumerate(modules):
        assert table.lookup(m, 99) == i + 1 == _peft_value(pattern, m, 99)
    assert table.lookup("model.layers.100.self_attn.q_proj", 99) == 99


def test_backtracking_key_is_linear_time():
    module = "model." + "a" * 5000 + "!"  # (a+)+b takes Python's re exponential time on this
    table = PatternTable("rank_pattern", {"(a+)+b": 2, "(x+x+)+y": 3})
    start = time.perf_counter()
    assert table.lookup(module, 8) == 8
    assert time.perf_counter() - start < 0.1


def test_non_ascii_module_names():
    table = PatternTable("rank_pattern", {r"caf.\.q": 2, "q_proj": 3})
    assert table.lookup("model.café.q", 8) == 2 and table.lookup("model.cafe.q", 8) == 2
    strict = PatternTable("rank_pattern", {r"\w+\.q": 2})
    assert strict.lookup("model.cafe.q", 8) == 2
    with pytest.raises(AdapterError) as e:  # Python's Unicode \w would have to be guessed at
        strict.lookup("model.café.q", 8)
    assert "non-ASCII" in assert_one_line(e.value)


def test_compile_pattern_key_kinds():
    assert compile_pattern_key(r"model\.layers\.0\.q_proj") == "model.layers.0.q_proj"  # plain name: no regex
    regexp, ascii_only = compile_pattern_key(r"layers\.\d+\.q_proj")
    assert ascii_only and regexp.match("model.layers.12.q_proj") and not regexp.match("model.layers.x.q_proj")
    regexp, ascii_only = compile_pattern_key("layers.0.q_proj")
    assert not ascii_only and regexp.match("model.layers-0-q_proj")  # a bare "." is any character, as in PEFT
