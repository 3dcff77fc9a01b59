"""Give a MatMul that reads ``Transpose(W)`` of a constant its own transposed weight.

Tied embeddings export the LM head as ``MatMul(h, Transpose(E))``, with ``E`` ``[vocab, hidden]``
also read by the embedding ``Gather``. Such an op is not a linear op with a constant weight, so
it would stay FP, and ``E`` itself cannot be smoothed or quantized without changing the
embedding. This pass rewrites::

    MatMul(h, Transpose(E))   ->   MatMul(h, Eᵀ)      Eᵀ: a new initializer, exact

leaving ``E`` to its other readers; a Transpose nothing else reads is removed. (ONNX Runtime
folds the same Transpose when it loads the model.) Afterwards the op is an ordinary linear op:
smoothing scales the rows of ``Eᵀ`` and quantization stores it per output channel.
:func:`retie` undoes the rewrite for ops that ended up neither smoothed nor quantized, so
the output file does not carry an FP copy of ``E`` for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from passes.ir.graph import GraphView, attribute
from passes.ir.naming import NameFactory


@dataclass(frozen=True)
class Untied:
    op: onnx.NodeProto  # the MatMul
    transpose: onnx.NodeProto  # the Transpose it read (a copy, for retie)
    source: str  # the initializer E
    weight: str  # the new initializer Eᵀ


def untie_transposed_weights(view: GraphView) -> list[Untied]:
    """Rewrite every MatMul whose weight is a 2-D ``Transpose`` of an initializer; returns them."""
    names = NameFactory(view.all_names())
    untied, made = [], {}
    for node in list(view.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        transpose = view.producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose":
            continue
        source = view.constant_source(transpose.input[0])
        if source is None or len(view.store.proto(source).dims) != 2 \
                or list(attribute(transpose, "perm", [1, 0])) != [1, 0]:
            continue
        if view.constant_source(node.input[0]) is not None:
            continue  # constant x constant: not a GEMM on activations
        key = transpose.output[0]
        if key not in made:
            made[key] = names.transposed_constant(source)
            view.set_initializer(made[key], np.ascontiguousarray(view.store.array(source).T))
        saved = onnx.NodeProto()
        saved.CopyFrom(transpose)
        node.input[1] = made[key]
        untied.append(Untied(node, saved, source, made[key]))
    view.rebuild()
    for key in made:
        producer = view.producer.get(key)
        if producer is not None and not view.consumers.get(key) and key not in view.graph_outputs:
            view.graph.node.remove(producer)
    view.rebuild()
    return untied


def retie(view: GraphView, untied: list[Untied]) -> list[str]:
    """Put ``Transpose(E)`` back for ops that still read an unchanged ``Eᵀ``; returns their names."""
    restored = []
    for u in untied:
        if not any(n is u.op for n in view.graph.node) or u.op.input[1] != u.weight \
                or u.weight not in view.initializers:
            continue  # quantized (rewritten, or reads a DequantizeLinear)
        if not np.array_equal(view.store.array(u.weight), view.store.array(u.source).T):
            continue  # smoothed: its rows were scaled, it is no longer E's transpose
        if u.transpose.output[0] not in view.producer:
            view.graph.node.insert(next(i for i, n in enumerate(view.graph.node) if n is u.op), u.transpose)
        u.op.input[1] = u.transpose.output[0]
        restored.append(u.op.name or u.op.output[0])
        view.rebuild()
    view.drop_unused_initializers()
    return restored
