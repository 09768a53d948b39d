"""Backend conversions (torch -> ONNX, ONNX -> quantized ONNX, ONNX -> TensorRT, adapter -> other
formats), one module per conversion with the same shape of API. Installed as ``edgelora.converters``.

Populated by the export issue; the package exists now so the layout and the wheel mapping are fixed.
"""
