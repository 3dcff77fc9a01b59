"""A small index over an ONNX graph: who produces and who consumes each tensor, and constants.

Passes read the graph through :class:`GraphView` and edit the underlying
``onnx.GraphProto`` directly; call :meth:`GraphView.rebuild` after structural edits.

Subgraphs are graphs: an ``If``/``Loop``/``Scan`` node reads, besides its inputs, every outer
tensor its bodies name without defining (:func:`implicit_inputs`), so it counts among those
tensors' consumers; names inside bodies count as taken; rewiring a reader also rewires its
bodies (:func:`replace_input`). Passes rewrite only top-level nodes: linear ops inside bodies
stay in floating point.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from passes.ir.onnx_io import TensorStore


class GraphView:
    def __init__(self, graph: onnx.GraphProto, store: TensorStore, outer: GraphView | None = None):
        self.graph = graph
        self.store = store
        self.outer = outer
        self.rebuild()

    def body(self, graph: onnx.GraphProto) -> GraphView:
        """A view of one of this graph's subgraphs, seeing the enclosing scopes' producers and constants."""
        return GraphView(graph, self.store.scoped(graph), outer=self)

    def rebuild(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
            for inp in implicit_inputs(node) - set(node.input):
                self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.graph_inputs = {i.name for i in self.graph.input}
        self.initializers = {t.name for t in self.graph.initializer}
        if self.outer is not None:  # names the body does not define come from the enclosing scope
            local = _defined(self.graph)
            self.producer = {**{k: v for k, v in self.outer.producer.items() if k not in local}, **self.producer}
            self.initializers |= self.outer.initializers - local
        self.store.refresh(self.graph)

    def all_names(self) -> set[str]:
        """Every name taken, in subgraphs too (an inserted name must not collide with one there)."""
        return graph_names(self.graph)

    def node_label(self, node: onnx.NodeProto) -> str:
        return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node producing {node.output[0]!r}"

    def exclusive(self, tensor: str, users: list[onnx.NodeProto]) -> bool:
        """True if ``tensor`` is read only by ``users`` and is not a graph output."""
        if tensor in self.graph_outputs:
            return False
        ids = {id(n) for n in users}
        return all(id(c) in ids for c in self.consumers.get(tensor, []))

    def drop_unused_initializers(self) -> None:
        """Remove initializers and Constant nodes no node reads (left by cloning or quantizing);
        overridable inputs stay."""
        used = {i for n in self.graph.node for i in (*n.input, *implicit_inputs(n))} | self.graph_outputs
        used |= self.graph_inputs
        dead = [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] not in used]
        for node in dead:
            self.graph.node.remove(node)
        unused = [i for i, t in enumerate(self.graph.initializer) if t.name not in used]
        # Deleted in place, from the back: clearing the list and re-adding the kept tensors would
        # copy every inline tensor (and the upb backend keeps the old copies alive).
        for i in reversed(unused):
            del self.graph.initializer[i]
        if dead or unused:
            self.rebuild()

    def insert(self, placements: list[tuple[onnx.NodeProto, onnx.NodeProto]], *, after: bool = False) -> None:
        """Insert each ``(new, anchor)`` before (or after) ``anchor``, a node of the graph; nodes
        with the same anchor keep their order. One pass over the graph, whatever the count (call
        :meth:`rebuild` afterwards)."""
        position = {id(n): i for i, n in enumerate(self.graph.node)}
        by_anchor: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        for new, anchor in placements:
            by_anchor[position[id(anchor)] + (1 if after else 0)].append(new)
        for at in sorted(by_anchor, reverse=True):  # from the back, so earlier positions stay valid
            for k, new in enumerate(by_anchor[at]):
                self.graph.node.insert(at + k, new)

    # Constants -----------------------------------------------------------------------

    def constant_source(self, tensor: str) -> str | None:
        """The initializer that ``tensor`` is, directly or through Identity nodes; else None.

        Graph inputs that shadow an initializer (IR < 4 style) are not constants.
        """
        seen = 0
        while tensor not in self.initializers:
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity" or seen > 16:
                return None
            tensor, seen = node.input[0], seen + 1
        if tensor in self.graph_inputs:
            return None
        return tensor

    def constant_value(self, tensor: str) -> np.ndarray | None:
        """The value of ``tensor`` if it is a constant (initializer, Identity of one, Constant node)."""
        source = self.constant_source(tensor)
        if source is not None:
            return self.store.array(source)
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def initializer_users(self, name: str) -> list[onnx.NodeProto]:
        """Every node reading initializer ``name``, also through Identity nodes."""
        users = []
        for node in self.consumers.get(name, []):
            if node.op_type == "Identity":
                users.extend(self.initializer_users(node.output[0]))
            else:
                users.append(node)
        return users

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Replace (or add) initializer ``name`` with ``value``, stored inline."""
        value = np.asarray(value)
        new = numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(order="C"), name)
        if name in self.initializers:
            next(t for t in self.graph.initializer if t.name == name).CopyFrom(new)
            self.store.refresh(self.graph)
        else:
            self.graph.initializer.append(new)
            self.initializers.add(name)
            self.store.track(self.graph.initializer[-1])


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies held in ``node``'s attributes (If's branches, Loop's and Scan's body)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` reads from enclosing scopes: what its nodes (and their bodies, and its
    outputs) name without ``graph`` defining it."""
    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(i for i in n.input if i)
        for body in subgraphs(n):
            read |= outer_references(body)
    return read - _defined(graph)


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer tensors ``node``'s bodies read (empty for a node without subgraphs)."""
    bodies = subgraphs(node)
    return set().union(*(outer_references(b) for b in bodies)) if bodies else set()


def replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` read ``new`` wherever it reads ``old``: its inputs, and its bodies' outer reads."""
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
    for body in subgraphs(node):
        if old in _defined(body):
            continue  # shadowed there (not valid ONNX, but never rewire a local name)
        for inner in body.node:
            replace_input(inner, old, new)
        for out in body.output:
            if out.name == old:
                out.name = new


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name of ``graph`` and of the bodies nested in it."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for body in subgraphs(node):
            names |= graph_names(body)
    return names


def declared_dtype(view: GraphView, tensor: str) -> np.dtype | None:
    """The element type the graph declares for ``tensor`` (value_info, inputs, outputs), if any."""
    for vi in list(view.graph.value_info) + list(view.graph.input) + list(view.graph.output):
        if vi.name == tensor and vi.type.tensor_type.elem_type:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return None


def activation_dtype(view: GraphView, tensor: str, _depth: int = 0) -> np.dtype:
    """The element type of ``tensor``: declared (value_info, inputs, outputs), else traced back
    through its producers (a Cast's target, a float constant input, or the first input)."""
    declared = declared_dtype(view, tensor)
    if declared is not None:
        return declared
    if tensor in view.initializers:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(view.store.proto(tensor).data_type))
    node = view.producer.get(tensor)
    if node is None or _depth > 64:
        return np.dtype(np.float32)
    if node.op_type == "Cast":
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if node.op_type == "Constant":
        value = view.constant_value(tensor)
        return value.dtype if value is not None else np.dtype(np.float32)
    for inp in node.input:
        source = view.constant_source(inp) if inp else None
        if source is not None:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(view.store.proto(source).data_type))
            if dtype.kind == "f" or str(dtype) == "bfloat16":
                return dtype
    first = next((i for i in node.input if i), None)
    return activation_dtype(view, first, _depth + 1) if first else np.dtype(np.float32)


# Opset from which each reduction takes ``axes`` as an input instead of an attribute.
_AXES_AS_INPUT = {"ReduceSum": 13}


def make_reduce(op: str, inp: str, out: str, axes: list[int], opset: int, name: str, keepdims: int,
                add_axes: Callable[[np.ndarray], str]) -> onnx.NodeProto:
    """A Reduce* node over ``axes``, valid at ``opset``; ``add_axes`` stores the axes constant
    (when the opset wants an input) and returns its name."""
    if opset >= _AXES_AS_INPUT.get(op, 18):
        return onnx.helper.make_node(op, [inp, add_axes(np.array(axes, dtype=np.int64))], [out], name=name,
                                     keepdims=keepdims)
    return onnx.helper.make_node(op, [inp], [out], name=name, axes=axes, keepdims=keepdims)


def ensure_opset_import(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` unless the model already imports it (custom and contrib ops)."""
    if not any(i.domain == domain for i in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ValueError("model has no default-domain opset import")
