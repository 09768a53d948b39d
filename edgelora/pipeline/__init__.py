"""``edgelora build``: the CI pipeline that turns tasks × targets into per-task engines, a deployment folder and
device bundle per target, and a report — incrementally, in parallel, and safe to kill.

- ``spec.py``       PIPELINE.toml read and checked (``pipeline.schema.json``: the same rules as JSON Schema)
- ``build.py``      the stages and each cell's key (what it depends on)
- ``cells.py``      what one cell does, in a worker process or a Ray task
- ``cache.py``      the content-addressed cell cache (atomic, lock-protected, a plain folder; cells signed with
                    the build's key, verified when read)
- ``rederive.py``   what a build re-derives instead of trusting the cache, before a folder is published
- ``executors.py``  local worker processes or Ray
- ``report.py``     gates, report.md / report.json / charts, the console table
"""

from .build import Build, BuildResult, build, emit_matrix
from .spec import Pipeline, load_pipeline

__all__ = ["Build", "BuildResult", "Pipeline", "build", "emit_matrix", "load_pipeline"]
