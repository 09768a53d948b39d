"""Where one LoRA target's W0 lives in an engine: the one location type of exporter, manifest and runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeploymentError


@dataclass(frozen=True)
class WeightLocation:
    """Where W0 of one module lives in the graph, in the graph's layout.

    ``shape``: of the whole initializer. ``transposed``: it holds W0ᵀ (in, out) rather than W0 (out, in).
    ``slice``: for a packed initializer (q, k, v in one), the [start, stop) this module occupies along the
    output axis (columns when transposed, rows otherwise); ``None`` when the module has it whole.
    """

    initializer: str
    shape: tuple[int, ...]
    transposed: bool
    slice: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "shape": list(self.shape), "transposed": self.transposed,
                "slice": list(self.slice) if self.slice else None}

    @classmethod
    def from_json(cls, d: Any, field: str = "location", where: str = "manifest.json") -> WeightLocation:
        """Parse and check one location (a manifest may come from anywhere): every error names ``field``."""
        def bad(why: str) -> DeploymentError:
            return DeploymentError(f"{where}: {field}: {why}; re-export the folder")

        if not isinstance(d, Mapping):
            raise bad("must be an object {initializer, shape, transposed, slice}")
        init, shape, transposed, sl = d.get("initializer"), d.get("shape"), d.get("transposed"), d.get("slice")
        if not isinstance(init, str) or not init:
            raise bad("initializer must be a non-empty string")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_positive(x) for x in shape)):
            raise bad(f"shape {shape!r:.40} must be two positive integers")
        if not isinstance(transposed, bool):
            raise bad("transposed must be true or false")
        axis = shape[1] if transposed else shape[0]
        if sl is not None and not (isinstance(sl, list) and len(sl) == 2 and all(_count(x) for x in sl)
                                   and sl[0] < sl[1] <= axis):
            raise bad(f"slice {sl!r:.40} must be [start, stop) within the output axis ({axis})")
        return cls(init, (shape[0], shape[1]), transposed, (sl[0], sl[1]) if sl else None)

    @property
    def layout(self) -> str:
        """The layout ΔW is computed in for this weight: ``in_out`` when stored transposed, else ``out_in``
        (the exporter merges in it, the runtime rebuilds in it, so both give the same bits)."""
        return "in_out" if self.transposed else "out_in"

    def dims(self) -> tuple[int, int]:
        """(in, out) features of the layer (out: this module's slice when packed)."""
        rows, cols = self.shape
        if self.slice is not None:
            width = self.slice[1] - self.slice[0]
            return (rows, width) if self.transposed else (cols, width)
        return (rows, cols) if self.transposed else (cols, rows)

    def read(self, init: np.ndarray) -> np.ndarray:
        """This module's W0 as (out, in), from the whole initializer array."""
        part = init
        if self.slice is not None:
            a, b = self.slice
            part = init[:, a:b] if self.transposed else init[a:b, :]
        return part.T if self.transposed else part

    def write(self, init: np.ndarray, w_out_in: np.ndarray) -> None:
        """Store a (out, in) weight into its place in the whole initializer array (in place)."""
        value = w_out_in.T if self.transposed else w_out_in
        if self.slice is None:
            init[...] = value
        elif self.transposed:
            init[:, self.slice[0]:self.slice[1]] = value
        else:
            init[self.slice[0]:self.slice[1], :] = value


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive(v: Any) -> bool:
    return _count(v) and v > 0
