"""edgelora.runtime: the on-device library. One base engine, many task deltas, millisecond swaps.

Imports numpy and onnxruntime only (and ``tokenizers`` when given text): never torch, transformers,
peft or onnx. ::

    from edgelora.runtime import Runtime
    rt = Runtime.open("out/cpu-fp32", threads=2)
    rt.activate("sst2")
    rt.run(text="a gorgeous, witty, seductive movie")["logits"]
"""

from ..errors import DeltaError, DeploymentError, InputError
from .runtime import Prediction, Runtime

__all__ = ["DeltaError", "DeploymentError", "InputError", "Prediction", "Runtime"]
