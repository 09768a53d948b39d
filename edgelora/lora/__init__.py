"""The LoRA math that export and the on-device runtime must agree on bit for bit (numpy only).

- :mod:`.delta`  ``ΔW = s·B·A`` per storage layout, and ``DeltaModule`` (one module of a task delta)
- :mod:`.quant`  the int8 recipes re-applied to rebuilt or patched weights (full and reduced range)
- :mod:`.feeds`  feeds of the LoRA-branch graph (one task, or rows of several tasks in one batch)
"""

from .delta import LAYOUTS, DeltaModule, lora_delta_in_out, lora_delta_out_in
from .feeds import MASK_INPUT, concat_feeds, lora_input_names, stacked_feeds, task_rank
from .quant import (
                    INT8_LEVELS,
                    PAIR_LIMIT,
                    SATURATING_PAIR,
                    int8_per_column,
                    int8_per_column_into,
                    int8_recipe,
                    max_pair_sum,
)

__all__ = ["INT8_LEVELS", "LAYOUTS", "MASK_INPUT", "PAIR_LIMIT", "SATURATING_PAIR", "DeltaModule", "concat_feeds",
           "int8_per_column", "int8_per_column_into", "int8_recipe", "lora_delta_in_out", "lora_delta_out_in",
           "lora_input_names", "max_pair_sum", "stacked_feeds", "task_rank"]
