"""The deployment contract: what ``edgelora export`` writes and ``edgelora.runtime`` reads.

- :mod:`.manifest`    ``manifest.json`` parsed into typed, checked dataclasses (format version, files table)
- :mod:`.files`       paths kept inside the folder, regular files only, sizes and sha256 checked
- :mod:`.safetensors` the strict numpy safetensors reader (deltas, W0)
- :mod:`.location`    where a LoRA target's W0 lives in an engine

numpy and the standard library only: the on-device runtime imports this package.
"""

from .files import FileEntry
from .location import WeightLocation
from .manifest import FORMAT_VERSION, MANIFEST, Manifest, TaskEntry, parse_manifest, read_manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "FileEntry", "Manifest", "TaskEntry", "WeightLocation", "parse_manifest",
           "read_manifest"]
