"""ONNX Runtime sessions as the runtime (and every engine timed beside it) opens and runs them.

One place for the session options (threads, spinning) and for turning onnxruntime's own exception types into
one-line errors: an engine it cannot load names the file; an engine that fails on checked inputs names the
folder and ``edgelora verify``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeploymentError, EdgeloraError
from ..format.files import FileEntry, locate, read_bytes


def session_options(threads: int | None, spinning: bool = True) -> Any:
    """ONNX Runtime's defaults and the thread count. Worker threads spin between the steps of a run
    (``spinning``; off: they sleep at once, kinder to an app sharing the cores, ~3-4% slower runs on W1)
    but stop spinning when the run returns (``session.force_spinning_stop``). ONNX Runtime's default keeps
    them spinning after it: measured on W1, a core's worth of CPU (48 ms in 50 ms idle) taken from
    whatever the app does next — an ``activate`` right after a run then took 3.3-3.7 ms instead of 2.3-2.9."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts



GRAPH_HASH_LIMIT = 16 << 20  # graphs whose weights sit in a .data file: their sha256 costs well under 1 ms


def open_session(folder: Path, rel: str, provider: str, threads: int | None, spinning: bool = True,
                 entry: FileEntry | None = None, provider_options: Mapping[str, str] | None = None,
                 config: Mapping[str, str] | None = None) -> Any:
    """A session on ``folder/rel`` (a regular file inside the folder), or a one-line DeploymentError. A graph
    file of at most 16 MB (its weights in an external data file) is first checked against its manifest
    ``entry``: the graph names its data file, so a swapped graph cannot point ONNX Runtime elsewhere; the
    data files are size-checked at open and hashed with ``verify``. ``provider_options``: the provider's
    options (a device provider's, from the manifest); ``config``: session config entries (ORT-format models)."""
    import onnxruntime as ort

    path = locate(folder, rel, "engine")
    if entry is not None and entry.size <= GRAPH_HASH_LIMIT:
        read_bytes(folder, rel, "engine", entry)
    options = session_options(threads, spinning)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    first: Any = (provider, dict(provider_options)) if provider_options else provider
    providers = [provider] if provider == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a file it cannot load
        raise DeploymentError(f"{folder / rel}: ONNX Runtime cannot load this engine ({_first_line(exc)}); it is "
                              f"corrupt or from another version: run `edgelora verify {folder}` or re-export") from None


def run_session(sess: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str], folder: Path
                ) -> dict[str, np.ndarray]:
    try:
        return dict(zip(names, sess.run(None, dict(feeds)), strict=True))
    except Exception as exc:  # onnxruntime's own exception types; inputs were checked, so this is the engine
        raise EdgeloraError(f"{folder}: the engine failed on this input ({_first_line(exc)}); "
                            f"run `edgelora verify {folder}`") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else type(exc).__name__).replace("\n", " ")
