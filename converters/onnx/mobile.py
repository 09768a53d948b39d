"""ONNX -> ONNX Runtime Mobile: ORT-format models and the operator config of a minimal build.

ONNX Runtime Mobile runs ``.ort`` models (a flatbuffer of the graph as ONNX Runtime optimized it) from a
minimal build whose kernels are only those a ``required_operators.config`` lists. Both come from ONNX Runtime's
own converter (``onnxruntime.tools.convert_onnx_models_to_ort``), called here on the engines of ``base/`` at
once, so the config covers every model the app may load and nothing else.

Why the converter and not our own serializer: the ``.ort`` holds the graph *after* ONNX Runtime's optimizers at
the chosen level (a minimal build cannot optimize: it has no optimizer for most passes), and only the converter
knows which passes a minimal build may replay (``optimization_style = "runtime"``).

Three facts shape the rest:

- an ``.ort`` has no external data: every weight is inside it, so each model is a full copy (the swap graph's
  fp32 W0 therefore lives in ``base/swap_w0.safetensors``, not in a ``.onnx.data`` file the phone lacks);
- an ``.ort`` is not optimized again when it is loaded, so its counterpart is the ``.onnx`` opened with the
  converter's own settings (:func:`counterpart_options`): level, ``session.qdqisint8allowed`` for ``arm``, the
  NCHWc layout pass off, and for the runtime style only the passes a minimal build replays. Opened so, the two
  compute the same bytes (checked by the export for every model);
- the converter reads its optimization level from an environment variable and prints its progress; both are
  confined to :func:`convert`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError
from edgelora.format.layout import MOBILE_DIR, OPERATORS_CONFIG, ort_model_path

_LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"


@dataclass(frozen=True)
class OrtModels:
    """What :func:`convert` wrote: each engine's ``.ort`` (folder-relative paths) and the operator config."""

    engines: dict[str, str]  # base/swap.onnx -> mobile/swap.ort
    operators: str
    onnxruntime: str  # the converter's version


def convert(out: Path, work: Path, engines: Sequence[str], mobile: Any) -> OrtModels:
    """``out/mobile/*.ort`` for ``engines`` (paths in ``out``, all in one folder with their data files) and
    ``out/mobile/required_operators.config``, as ONNX Runtime's converter writes them for ``mobile`` (the
    target's ``[mobile]``)."""
    import onnxruntime as ort

    src, dst = work / "ort-src", work / "ort-out"
    for d in (src, dst):
        shutil.rmtree(d, ignore_errors=True)
    src.mkdir(parents=True)
    folders = {(out / e).parent for e in engines}
    if len(folders) != 1:
        raise ValueError(f"engines from several folders: {sorted(map(str, folders))}")  # layout keeps them in base/
    for rel in engines:
        _link(out / rel, src / Path(rel).name)
    for data in sorted(folders.pop().glob("*.data")):  # what the graphs' external data names point at
        _link(data, src / data.name)
    with _converter() as run:
        run(src, dst, mobile)
    suffix = _suffix(mobile)
    (out / MOBILE_DIR).mkdir(exist_ok=True)
    made: dict[str, str] = {}
    for rel in engines:
        ort_file = dst / f"{Path(rel).stem}{suffix}.ort"
        if not ort_file.is_file():
            raise EdgeloraError(f"ONNX Runtime's converter wrote no {ort_file.name} for {rel}; "
                                f"is onnxruntime {ort.__version__} complete?")
        made[rel] = ort_model_path(rel)
        os.replace(ort_file, out / made[rel])
    config = dst / f"required_operators{suffix}.config"
    (out / OPERATORS_CONFIG).write_text(_relative_header(config.read_text(encoding="utf-8"), suffix), encoding="utf-8")
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return OrtModels(made, OPERATORS_CONFIG, ort.__version__)


def counterpart_options(mobile: Any, options: Any) -> tuple[Any, list[str]]:
    """(``options`` set as the converter sets its session, the optimizers it disables): an ``.onnx`` opened with
    them computes what its ``.ort`` computes."""
    import onnxruntime as ort
    from onnxruntime.tools.onnx_model_utils import get_optimization_level

    options.graph_optimization_level = get_optimization_level(mobile.optimization_level)
    options.add_session_config_entry("session.qdqisint8allowed", "1" if mobile.target_platform == "arm" else "0")
    if mobile.optimization_style == "runtime":
        options.add_session_config_entry("optimization.minimal_build_optimizations", "apply")
    # the converter leaves out the NCHWc layout pass for any platform but amd64 (it makes x86-only models)
    layout = options.graph_optimization_level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                                  ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT)
    return options, ["NchwcTransformer"] if layout and mobile.target_platform != "amd64" else []


def _suffix(mobile: Any) -> str:
    """The converter's file-name suffix for a level and style (``.basic``, ``.with_runtime_opt``)."""
    level = "" if mobile.optimization_level == "all" else f".{mobile.optimization_level}"
    return level + (".with_runtime_opt" if mobile.optimization_style == "runtime" else "")


def _link(src: Path, dst: Path) -> None:
    """A hard link (the converter only reads it), a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _relative_header(text: str, suffix: str) -> str:
    """The converter's config names the models it read by absolute path, in comments (the runtime style also
    names its second, temporary pass); name each once as the deployment folder does: the same bytes on every
    machine, no path of the exporting machine."""
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("# - "):
            name = line[4:].strip().rsplit("/", 1)[-1]
            for part in (suffix, suffix.removesuffix(".with_runtime_opt")):
                name = name.replace(f"{part}.ort", ".ort") if part else name
            line = f"# - {MOBILE_DIR}/{name}\n"
            if line in lines:
                continue
        lines.append(line)
    return "".join(lines)


@contextlib.contextmanager
def _converter() -> Iterator[Any]:
    """ONNX Runtime's converter, quiet: its prints and its logger (whose import calls ``logging.basicConfig``:
    a handler on the root logger, removed again), its level from ``mobile`` through its environment variable."""
    import onnxruntime as ort

    root = logging.getLogger()
    before = list(root.handlers)
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    for handler in set(root.handlers) - set(before):
        root.removeHandler(handler)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)

    def run(src: Path, dst: Path, mobile: Any) -> None:
        style = OptimizationStyle.Runtime if mobile.optimization_style == "runtime" else OptimizationStyle.Fixed
        old = os.environ.get(_LEVEL_ENV)
        os.environ[_LEVEL_ENV] = mobile.optimization_level
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[style],
                                           target_platform=mobile.target_platform)
        except Exception as exc:  # onnxruntime's own exception types
            raise EdgeloraError(f"ONNX Runtime's ORT-format converter failed ({str(exc).splitlines()[0][:160]}); "
                                "the [mobile] settings or this onnxruntime cannot convert these engines") from None
        finally:
            if old is None:
                os.environ.pop(_LEVEL_ENV, None)
            else:
                os.environ[_LEVEL_ENV] = old

    ort.set_default_logger_severity(3)  # the converter's sessions warn about every overridable initializer
    try:
        yield run
    finally:
        ort.set_default_logger_severity(2)
