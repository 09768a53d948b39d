"""The TensorRT backend (``backend = "tensorrt"``): refittable engines for NVIDIA devices.

- ``plan.py``     what an engine build does — refittable LoRA-target weights, profiles, flags — and the check of a
                  built engine's refit prototypes against it; pure Python, tested without a GPU
- ``builder.py``  the TensorRT calls (lazy ``import tensorrt``; needs a GPU)
- ``folder.py``   a plan (and an engine) for an exported ``cuda-fp16`` deployment folder, from its manifest
- ``backend.py``  the registry entry: refuses in one line where TensorRT cannot run

Status: no GPU has been lent to this work yet; ``scripts/gpu-check`` runs what needs one.
"""
