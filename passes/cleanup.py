"""Cleanup passes: dead-code elimination, Identity/Dropout removal, constant folding.

These never change the model's numbers:

- ``dce`` removes nodes whose outputs reach no graph output (onnx-ir's ``RemoveUnusedNodesPass``),
  and initializers nothing reads.
- ``remove-identity`` removes ``Identity`` and inference-mode ``Dropout`` (``y = x`` when
  ``training_mode`` is absent or constant false; a Dropout's optional ``mask`` output must be
  unused).  Consumers of ``y`` read ``x`` instead.  When ``y`` is a graph output, the producer of
  ``x`` writes the graph output directly; when both are graph boundaries the node stays.
- ``constant-fold`` folds constant subgraphs and shape arithmetic with onnxsim.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from edgec import ir as eir
from edgec.errors import EdgecError
from edgec.passes_api import Pass, PassResult, PassStats, register_pass


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes and initializers that no graph output depends on"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        before_nodes = eir.count_nodes(model)
        before_inits = len(model.graph.initializers)
        common.RemoveUnusedNodesPass()(model)
        removed_nodes = before_nodes - eir.count_nodes(model)
        removed_inits = before_inits - len(model.graph.initializers)
        if removed_nodes:
            stats.count("nodes removed", removed_nodes)
        if removed_inits:
            stats.count("initializers removed", removed_inits)
        return self.result(model, stats)


def _dropout_is_inference(node: ir.Node) -> str | None:
    """None if this Dropout is the identity at inference, else why not."""
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return "its mask output is used"
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        mode = node.inputs[2].const_value
        if mode is None:
            return "training_mode is not a constant"
        if bool(mode.numpy().reshape(-1)[0]):
            return "training_mode is true"
    return None


@register_pass
class RemoveIdentity(Pass):
    name = "remove-identity"
    summary = "remove Identity and inference-mode Dropout nodes"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        for node in list(graph):
            if node.op_type not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx"):
                continue
            pattern = node.op_type.lower()
            if node.op_type == "Dropout":
                why = _dropout_is_inference(node)
                if why is not None:
                    stats.reject(pattern, node.name or "", why)
                    continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None:
                continue
            if y.is_graph_output():
                if x.is_graph_input() or x.is_graph_output() or x.is_initializer() or x.producer() is None:
                    stats.reject(pattern, node.name or "", "both its input and output are graph boundaries")
                    continue
                # let x take y's place as the graph output, keeping the output's name
                out_name = y.name
                y.replace_all_uses_with(x, replace_graph_outputs=True)
                graph.remove(node, safe=True)
                x.name = out_name
            else:
                ir.convenience.replace_all_uses_with(y, x)
                graph.remove(node, safe=True)
            stats.count(pattern)
        return self.result(model, stats)


@register_pass
class ConstantFold(Pass):
    name = "constant-fold"
    summary = "fold constant subgraphs and shape computations (onnxsim)"
    rewrites_in_place = False

    def call(self, model: ir.Model) -> PassResult:
        import onnxsim

        stats = PassStats()
        proto = eir.to_proto(model)
        before = len(proto.graph.node)
        try:
            simplified, _ = onnxsim.simplify(proto, check_n=0, perform_optimization=True)
        except Exception as exc:
            raise EdgecError(f"onnxsim could not simplify the model: {exc}", "run without constant-fold") from None
        removed = before - len(simplified.graph.node)
        if removed:
            stats.count("nodes folded", removed)
        out = eir.from_proto(simplified)
        return PassResult(out, removed != 0 or len(simplified.graph.initializer) != len(proto.graph.initializer), stats)
