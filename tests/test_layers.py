"""The layering rules, read from the code's own imports (ast): the on-device runtime imports only the format,
the LoRA math and the errors (plus numpy, onnxruntime, tokenizers); the format and the math import nothing of
the toolchain; converters reach into edgelora only for the format, the math, the target schema and the errors;
nothing but the CLI imports the export orchestration or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports a module x
    return out


def _files(folder: str, package: str) -> list[tuple[Path, str]]:
    root = REPO / folder
    return [(p, package + ("." + ".".join(p.relative_to(root).with_suffix("").parts[:-1])
                           if len(p.relative_to(root).parts) > 1 else "")) for p in sorted(root.rglob("*.py"))]


def _edgelora_parts(mods: set[str]) -> set[str]:
    return {m.split(".")[1] for m in mods if m.startswith("edgelora.") and len(m.split(".")) > 1}


THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "onnx", "torch", "transformers", "peft", "safetensors",
               "click", "tqdm", "tomli", "tomllib", "huggingface_hub"}


@pytest.mark.parametrize("folder, package, allowed, third", [
    ("edgelora/runtime", "edgelora.runtime", {"runtime", "format", "lora", "errors"},
     {"numpy", "onnxruntime", "tokenizers"}),
    ("edgelora/format", "edgelora.format", {"format", "lora", "errors"}, {"numpy"}),
    ("edgelora/lora", "edgelora.lora", {"lora"}, {"numpy"}),
    ("converters", "edgelora.converters", {"converters", "format", "lora", "target", "errors"}, THIRD_PARTY),
])
def test_layers_import_only_what_they_may(folder, package, allowed, third):
    for path, pkg in _files(folder, package):
        mods = _imports(path, pkg)
        wrong = sorted(_edgelora_parts(mods) - allowed)
        assert not wrong, f"{path.relative_to(REPO)} imports edgelora.{wrong[0]}"
        outside = sorted({m.split(".")[0] for m in mods} & (THIRD_PARTY - third))
        assert not outside, f"{path.relative_to(REPO)} imports {outside[0]}"


def test_nothing_imports_the_export_orchestration_or_the_cli():
    """The orchestration layers sit on top: the CLI over everything, the build pipeline over export's stages,
    export over the rest. Nothing below imports them (the pipeline only from the CLI)."""
    for path, pkg in [*_files("edgelora", "edgelora"), *_files("converters", "edgelora.converters")]:
        rel = path.relative_to(REPO).parts
        if path.name == "cli.py":
            continue
        parts = _edgelora_parts(_imports(path, pkg))
        assert "cli" not in parts, path.relative_to(REPO)
        if "pipeline" not in rel:
            assert "pipeline" not in parts, path.relative_to(REPO)
            if "export" not in rel:
                assert "export" not in parts, path.relative_to(REPO)


def test_ruff_is_clean_and_no_function_is_too_complex_without_saying_why():
    """ruff's rules of pyproject.toml, C901 (complexity > 15) among them: a function above it carries a comment
    saying why and ``# noqa: C901``."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
    for path in [*(REPO / "edgelora").rglob("*.py"), *(REPO / "converters").rglob("*.py")]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "noqa: C901" in line:
                above = " ".join(lines[max(0, i - 3):i])
                assert "# complexity:" in above, f"{path.relative_to(REPO)}:{i + 1} says no reason"
