"""edgec: an edge-deployment compiler and exporter for PyTorch models.

``model -> ONNX -> graph passes -> Apache TVM -> deployable artifact + measured latency``.

The public Python API lives in submodules:

- :mod:`edgec.ir` -- loading and saving ONNX models (atomic writes, clear errors).
- :mod:`edgec.passes_api` -- the pass contract (:class:`~edgec.passes_api.Pass`), results and registry.
- :mod:`edgec.pipeline` -- runs passes in order, times them and verifies numerics after each.
- :mod:`edgec.verify` -- numeric comparison of two ONNX models with onnxruntime.
- :mod:`edgec.analysis` -- op histogram, parameters, MACs and activation memory.
- :mod:`edgec.export` -- PyTorch -> ONNX export with onnxsim and verification.
- :mod:`edgec.passes`, :mod:`edgec.targets`, :mod:`edgec.models` -- pass families, compile targets, the zoo.
"""

__version__ = "0.1.0"
