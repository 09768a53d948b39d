"""``edgelora pack DIR -o BUNDLE``: the device bundle, only what ``edgelora.runtime`` reads on the device.

A deployment folder holds the base engine, the runtime's graphs, every task's delta, baked engine and ONNX
Runtime adapter file, the whole tokenizer folder and the report. A device needs much less: the engine of the
runtime's mode with its data (swap: ``base/swap.onnx``, whose fp32 weights and W0 live in the branch graph's
data; decoders: the branch graph), the deltas, ``tokenizer.json`` + ``tokenizer_config.json``, and baked
engines only for tasks that cannot be swapped (DoRA, LoRA bias). The branch graph comes along for mixed-task
batches where it shares the swap engine's data (fp32: it costs its 0.1 MB graph) or when ``mixed`` asks. A
mobile folder's bundle carries the ORT-format models (``mobile/*.ort``) in place of those engines.
The bundle's manifest is the folder's, narrowed to those files (same typed writer, same schema), and every
file is checked against the folder's manifest while it is copied. Written atomically.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DeploymentError, EdgeloraError
from ..format.files import locate, read_bytes, verify_files
from ..format.layout import MANIFEST, write_json
from ..format.manifest import Manifest, read_manifest
from ..fsutil import atomic_output_dir, check_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what runtime/text.py reads


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    files: list[str]

    @property
    def size_bytes(self) -> int:
        return sum(self.manifest.files[f].size for f in self.files)


def plan_bundle(folder: Path, manifest: Manifest, mixed: bool | None = None) -> Bundle:
    """Which files the runtime needs, and the bundle's manifest. ``mixed``: True keeps the branch graph for
    mixed-task batches, False drops it, None keeps it where it adds no data file."""
    need: set[str] = set()
    lora, swap = manifest.lora_graph, manifest.swap
    decoder = manifest.base.io.kind == "causal-lm"
    if swap is not None and not (decoder and lora is not None):
        need |= _engine_files(folder, manifest, swap.engine)
        need |= {w.source.file for w in swap.weights.values() if w.source is not None}
        if swap.w0 is not None:
            need.add(swap.w0)
    elif lora is None:  # engines mode: the base engine and every task's baked engine
        need |= _engine_files(folder, manifest, manifest.base.engine)
    keep_lora = lora is not None and (
        decoder or swap is None or mixed is True
        or (mixed is None and _engine_files(folder, manifest, lora.engine) - {lora.engine} <= need))
    if keep_lora:
        need |= _engine_files(folder, manifest, lora.engine)  # type: ignore[union-attr]
    tasks = {}
    for name, t in manifest.tasks.items():
        need.add(t.delta)
        engine_needed = (not t.swappable or (swap is None and lora is None) or bool(set(t.head) - _KNOWN_HEAD))
        if engine_needed and t.engine:
            need |= _engine_files(folder, manifest, t.engine)
        tasks[name] = replace(t, engine=t.engine if engine_needed else None,
                              engine_io=t.engine_io if engine_needed else None, ort_adapter=None)
    if manifest.conformance is not None:  # the reference vectors: what the device checks itself with
        need.add(manifest.conformance.file)
    if manifest.tokenizer is not None:
        need |= {f"{manifest.tokenizer}/{f}" for f in TOKENIZER_FILES if f"{manifest.tokenizer}/{f}" in manifest.files}
    files = sorted(need)
    keep_swap = swap is not None and _engine_files(folder, manifest, swap.engine) <= need
    mobile = manifest.mobile
    if mobile is not None:  # the .ort models it carries; the operator config is for building ONNX Runtime
        mobile = replace(mobile, engines={e: o for e, o in mobile.engines.items() if o in need}, operators=None)
    bundled = replace(manifest, lora_graph=lora if keep_lora else None, swap=swap if keep_swap else None,
                      mobile=mobile,
                      swap_unavailable=manifest.swap_unavailable if keep_swap or swap is None
                      else "not in the device bundle (decoders run tasks as LoRA branches)",
                      tasks=tasks, files={f: manifest.files[f] for f in files})
    return Bundle(bundled, files)


_KNOWN_HEAD = {"classifier.weight", "classifier.bias", "score.weight", "score.bias"}  # runtime/heads.py


def _engine_files(folder: Path, manifest: Manifest, engine: str) -> set[str]:
    """An ONNX engine and the external data files it names (each listed in the manifest); in a mobile folder,
    the engine's ORT-format model instead where it has one (what the runtime opens there, weights inside)."""
    import onnx

    if manifest.mobile is not None and engine in manifest.mobile.engines:
        return {manifest.mobile.engines[engine]}

    # read as the runtime reads: a regular file inside the folder (a FIFO in its place is refused, not waited on),
    # of the manifest's size and sha256, then parsed; bytes ONNX cannot parse are one line, not protobuf's error
    data = read_bytes(folder, engine, "engine", manifest.files.get(engine))
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, or onnx's own for a model it cannot read
        raise DeploymentError(f"{folder / engine}: not an ONNX model ({type(exc).__name__}); re-export the "
                              "folder") from None
    base = Path(engine).parent
    out = {engine}
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                rel = (base / entry.value).as_posix()
                if rel not in manifest.files:
                    raise EdgeloraError(f"{folder / engine}: its data file {entry.value} is not in the manifest; "
                                        "re-export the folder")
                out.add(rel)
    return out


def pack(folder: str | os.PathLike[str], output: str | os.PathLike[str], mixed: bool | None = None,
         force: bool = False) -> Bundle:
    """Write the device bundle of ``folder`` to ``output`` (every file checked against the manifest)."""
    folder = Path(folder)
    check_output(output, force=force, inputs=[("deployment folder", folder)])  # -o DIR for DIR: it would be lost
    manifest = read_manifest(folder)
    bundle = plan_bundle(folder, manifest, mixed)
    with atomic_output_dir(output, force=force) as out:
        for rel in bundle.files:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if manifest.files[rel].size <= 64 << 20:
                dst.write_bytes(read_bytes(folder, rel, "file", manifest.files[rel]))
            else:  # large engine data: streamed, then hashed where it landed
                shutil.copyfile(locate(folder, rel, "file"), dst)
                verify_files(out, {rel: manifest.files[rel]})
        write_json(out / MANIFEST, bundle.manifest.to_json())
    return bundle
