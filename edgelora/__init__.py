"""edgelora: LoRA adapters to the edge.

The library, one module per step (see ../shared/DESIGN.md):

- :mod:`edgelora.adapter`  PEFT adapter folders in and out, losslessly
- :mod:`edgelora.names`    the one place that knows PEFT's key and module-matching formats
- :mod:`edgelora.base`     base models: bundled default, folders, fingerprint, loading per task
- :mod:`edgelora.validate` adapter vs base checks -> a merge plan
- :mod:`edgelora.merge`    the merge math (pure ``delta``), into state dicts and models, unmerge
- :mod:`edgelora.train`    LoRA training with PEFT (paper recipe)
- :mod:`edgelora.cli`      the ``edgelora`` command

Heavy dependencies (torch, transformers, peft) are imported by the modules that need them, not here.
"""

from .errors import EdgeloraError, EdgeloraWarning

__version__ = "0.1.0"
__all__ = ["EdgeloraError", "EdgeloraWarning", "__version__"]
