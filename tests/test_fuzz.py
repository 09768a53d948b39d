"""Fuzzing the loaders with hypothesis: thousands of generated and mutated inputs per run, each of which may
only be accepted or refused with the project's one error type (one line), never crash with anything else
or hang (a per-case deadline). Inputs start from real files (an exported manifest and delta, a bundled
target, a PEFT adapter config) and are mutated field by field or byte by byte, so most cases get deep.

Run with ``-s`` to see the case counts and times."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelora.errors import EdgeloraError

KEYS = st.text(max_size=8) | st.sampled_from(["(", "[a", "*", "a{99999999999}", "query", "value", "r", "shape",
                                             "dtype", "data_offsets", "__metadata__", "format", "scales"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["../x", "/etc/passwd", "tasks//a", "F32", "int8", "float32", "a" * 70, "", "\x00", "(", "[",
                       "*query", "SEQ_CLS", "LORA"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=8,
)
FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, database=None)
COUNTS: dict[str, list[float]] = {}


def _mutate(data: st.DataObject, doc: Any, depth: int = 0) -> Any:
    """``doc`` with one value somewhere replaced by generated JSON, deleted, retyped, or a key added (deep copy)."""
    doc = json.loads(json.dumps(doc))
    if isinstance(doc, dict) and (not doc or data.draw(st.integers(0, 4)) == 0):
        doc[data.draw(KEYS)] = data.draw(JSON)
        return doc
    if not isinstance(doc, (dict, list)) or not doc or (depth and data.draw(st.integers(0, 3)) == 0):
        return data.draw(JSON)
    key = data.draw(st.sampled_from(sorted(doc) if isinstance(doc, dict) else list(range(len(doc)))))
    action = data.draw(st.sampled_from(["descend", "descend", "descend", "similar", "similar", "replace", "delete",
                                        "listify"]))
    if action == "similar":
        doc[key] = _similar(data, doc[key])
    elif action == "delete":
        del doc[key]
    elif action == "replace":
        doc[key] = data.draw(JSON)
    elif action == "listify":
        doc[key] = [doc[key]]
    else:
        doc[key] = _mutate(data, doc[key], depth + 1)
    return doc


def _similar(data: st.DataObject, v: Any) -> Any:
    """A value of ``v``'s type with hostile content: boundary numbers, paths out, regex metacharacters, keys
    that mean something elsewhere (so a mutation passes the type checks and reaches the code behind them)."""
    if isinstance(v, bool) or v is None:
        return data.draw(JSON)
    if isinstance(v, int):
        return data.draw(st.sampled_from([0, -1, 1, 3, 2 ** 31, 2 ** 63, 2 ** 70, v + 1, v - 1, v * 1000]))
    if isinstance(v, float):
        return data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e308, v * 2]))
    if isinstance(v, str):
        return data.draw(KEYS | st.text(max_size=12))
    if isinstance(v, list):
        out = [_similar(data, x) if data.draw(st.booleans()) else x for x in v]
        return out + ([data.draw(KEYS)] if data.draw(st.booleans()) else [])
    sample = next(iter(v.values()), 1)
    out = dict(v)
    out[data.draw(KEYS)] = _similar(data, sample) if not isinstance(sample, (dict, list)) else sample
    return out


def _check(loader: str, fn: Callable[[], Any]) -> None:
    """Run one case: accepted, or refused with a one-line EdgeloraError; anything else fails the test."""
    t0 = time.perf_counter()
    try:
        fn()
    except EdgeloraError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
    COUNTS.setdefault(loader, []).append(time.perf_counter() - t0)


def _report(loader: str) -> None:
    times = COUNTS.get(loader, [])
    print(f"\nfuzz {loader}: {len(times)} cases, {sum(times):.2f} s in the loader")
    assert len(times) >= 300, loader


@pytest.fixture(scope="module")
def deployment(exported) -> Path:
    return exported["bert"]


def test_fuzz_manifest(deployment):
    """Also: whatever the published JSON Schema refuses, the reader refuses (it checks more: cross references,
    the files table), so a runtime in another language that follows the schema is never laxer than ours."""
    from conftest import schema_validator

    from edgelora.format.manifest import parse_manifest

    good = json.loads((deployment / "manifest.json").read_text())
    parse_manifest(good)  # the unmutated manifest is accepted
    validator = schema_validator()
    assert validator.is_valid(good)

    @settings(FUZZ, max_examples=1500)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        doc = _mutate(data, good)
        _check("manifest", lambda: parse_manifest(doc, "fuzz/manifest.json"))
        if not validator.is_valid(doc):
            with pytest.raises(EdgeloraError):
                parse_manifest(doc, "fuzz/manifest.json")

    case()
    _report("manifest")


def test_fuzz_delta_and_safetensors_header(deployment):
    from edgelora.format.manifest import read_manifest
    from edgelora.runtime.store import DeltaRules, parse_task_delta

    manifest = read_manifest(deployment)
    raw = (deployment / manifest.tasks["t1"].delta).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    dims = {m: loc.dims() for m, loc in manifest.swap.modules.items()}
    rules = DeltaRules(manifest.base.fingerprint, dims, manifest.base.hidden_size)
    parse_task_delta("t1", raw, "fuzz", rules)  # the unmutated delta is accepted

    @settings(FUZZ, max_examples=1500)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        how = data.draw(st.sampled_from(["header", "header", "bytes", "truncate", "length"]))
        if how == "header":
            text = json.dumps(_mutate(data, header)).encode()
            blob = struct.pack("<Q", len(text)) + text + body
        elif how == "bytes":
            blob = bytearray(raw)
            for _ in range(data.draw(st.integers(1, 8))):
                blob[data.draw(st.integers(0, 8 + n + 63))] = data.draw(st.integers(0, 255))
            blob = bytes(blob)
        elif how == "truncate":
            blob = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            blob = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1))) + raw[8:]
        _check("delta", lambda: parse_task_delta("t1", blob, "fuzz", rules))

    case()
    _report("delta")


def test_fuzz_target_toml(tmp_path):
    import tomllib

    from edgelora.target import load_target, parse_target

    source = (REPO / "targets/cpu-int4.toml").read_text()
    good = tomllib.loads(source)
    path = tmp_path / "t.toml"

    @settings(FUZZ, max_examples=800)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        if data.draw(st.booleans()):
            doc = _mutate(data, good)
            _check("target", lambda: parse_target(doc, "fuzz.toml"))
        else:  # the text itself: a line dropped, or characters replaced
            lines = source.splitlines()
            i = data.draw(st.integers(0, len(lines) - 1))
            lines[i] = data.draw(st.sampled_from(["", "[x", "name = 5", "opset = 1e400", lines[i][::-1],
                                                  lines[i] + "\x00", "a.b.c = [1, 'x']"]))
            path.write_text("\n".join(lines), encoding="utf-8")
            _check("target", lambda: load_target(path))

    case()
    _report("target")


def test_fuzz_adapter_config():
    from safetensors.torch import load_file

    from edgelora.adapter import AdapterConfig, build_adapter

    folder = REPO / "examples/adapters/sst2"
    good = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    build_adapter(AdapterConfig.from_dict(good), tensors)  # the unmutated adapter is accepted

    @settings(FUZZ, max_examples=800)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        doc = _mutate(data, good)
        _check("adapter config", lambda: build_adapter(AdapterConfig.from_dict(doc, "fuzz.json"), tensors))

    case()
    _report("adapter config")


def test_fuzz_runtime_open(deployment, tmp_path):
    """The manifest mutations above, through the whole runtime: open (deltas, W0, engines), a switch, a run.
    Mutations that the parser accepts must still be refused (or run) with the project's error type."""
    import shutil

    import numpy as np

    from edgelora.runtime import Runtime

    folder = Path(shutil.copytree(deployment, tmp_path / "dep"))
    good = json.loads((folder / "manifest.json").read_text())
    ids = np.array([[2, 40, 41, 3]])

    def use() -> None:
        rt = Runtime.open(folder, threads=1)
        for task in rt.tasks[:1]:
            rt.activate(task)
        rt.run(input_ids=ids)

    use()

    @settings(FUZZ, max_examples=300)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        (folder / "manifest.json").write_text(json.dumps(_mutate(data, good)))
        _check("runtime open", use)

    case()
    _report("runtime open")
    assert len(COUNTS["runtime open"]) >= 300
