"""Where a smoothing division ``X / s`` can be absorbed, found by graph pattern.

A fold site rewrites the producer of X so it emits ``X / s`` directly:

* **norm** (:class:`AffineFold`): X = Z * gamma [+ beta] with per-channel constants, as
  in ``LayerNormalization(Z, gamma, beta)``, ``BatchNormalization`` (NCHW), or the
  decomposed LayerNorm/RMSNorm of torch exporters (a ReduceMean/Sqrt/Div chain ending
  in ``Mul(gamma)`` [+ ``Add(beta)``]). Then ``X / s = Z * (gamma / s) + beta / s``.
* **linear** (:class:`LinearOutputFold`): X = A (.) (P W_p + b_p), an elementwise product
  (or X itself) whose factor comes from a linear layer read by nothing else, as in
  SwiGLU's ``silu(gate) * up``. Then ``X / s = A (.) (P (W_p / s) + b_p / s)``: 1/s
  scales W_p's output channels.
* **attention value** (:class:`AttentionValueFold`): X = L2(P @ L1(Y W_v + b_v)), the input of
  an attention output projection: layout ops (L1, L2) around the attention-weighted sum of V.
  Then 1/s scales W_v's output columns through the channel map the layout ops make
  (:mod:`passes.value_fold` traces it).
* **mul** (:class:`InsertedMul`): no constant can absorb it; one explicit
  ``Mul(X, 1/s)`` is placed before the group's linear ops (reported as unfolded).

Intermediate tensors a site rescales must be read only by the site's own nodes, and
constants shared with other nodes are cloned. If X itself has readers outside the group
(the residual branch of a post-LN transformer), they are given ``Mul(X / s, s) = X``:
an elementwise op off the GEMM path, which runtimes fuse with the residual Add.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from passes.ir.graph import GraphView, activation_dtype, attribute, replace_input
from passes.linear import LinearOp
from passes.ir.naming import NameFactory


class FoldKind(enum.Enum):
    NORM = "norm"
    LINEAR = "linear"
    MUL = "mul"
    SPLIT = "split"  # not smoothed: outlier channels computed in FP (passes.split)


def channel_shape(shape: tuple[int, ...], channels: int, channel_axis: int, rank: int | None) -> tuple[int, ...] | None:
    """The shape a ``[C]`` vector must take to broadcast like a constant of ``shape``.

    None if the constant does not act per channel along ``channel_axis`` (-1: last axis;
    1: NCHW channel axis of a rank-``rank`` tensor). Scalars broadcast to every channel.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if channel_axis == -1:
        if size == 1 or (shape and shape[-1] == channels and size == channels):
            return (channels,) if size == 1 else tuple(shape)
        return None
    if rank is None:
        return None
    natural = (channels,) + (1,) * (rank - 2)
    if size == 1:
        return natural
    if size != channels or len(shape) > rank:
        return None
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return tuple(shape) if padded[1] == channels else None


@dataclass
class FoldContext:
    view: GraphView
    names: NameFactory
    group_nodes: list[onnx.NodeProto]
    notes: list[str]

    def private_constant(self, node: onnx.NodeProto, index: int, allowed: list[onnx.NodeProto]) -> str:
        """Make ``node.input[index]`` an initializer read by ``allowed`` nodes only; return its name.

        Shared initializers (and Constant-node values) are copied into a new initializer.
        """
        view, tensor = self.view, node.input[index]
        source = view.constant_source(tensor)
        if source is not None:
            allowed_ids = {id(n) for n in allowed}
            if all(id(u) in allowed_ids for u in view.initializer_users(source)):
                if tensor != source:  # skip the Identity so the value is read directly
                    self._rewire(allowed, tensor, source)
                return source
            value = view.store.array(source)
            self.notes.append(f"cloned constant {source!r} (shared with other nodes)")
        else:
            value = view.constant_value(tensor)
            source = tensor
        clone = self.names.cloned_constant(source)
        view.set_initializer(clone, value)
        self._rewire(allowed, tensor, clone)
        return clone

    def _rewire(self, nodes: list[onnx.NodeProto], old: str, new: str) -> None:
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self.view.rebuild()

    def scale_constant(self, node: onnx.NodeProto, index: int, factor: np.ndarray, allowed: list[onnx.NodeProto],
                       axis: int | None, channel_axis: int, rank: int | None) -> None:
        """Multiply the constant at ``node.input[index]`` by ``factor`` per channel.

        ``axis`` set: the constant is a weight and ``factor`` runs along that axis.
        ``axis`` None: the constant broadcasts against the activation (gamma, beta, bias).
        """
        name = self.private_constant(node, index, allowed)
        value = self.view.store.array(name)
        if axis is not None:
            shape = [1] * value.ndim
            shape[axis] = factor.size
            new = value.astype(np.float64) * factor.reshape(shape)
        else:
            shape = channel_shape(value.shape, factor.size, channel_axis, rank)
            base = value.reshape(()) if value.size == 1 else value  # a scalar becomes per-channel
            new = base.astype(np.float64) * factor.reshape(shape)
        self.view.set_initializer(name, new.astype(value.dtype))


@dataclass(frozen=True)
class AffineFold:
    """X = Z * gamma [+ beta]: divide gamma and beta by s."""

    kind = FoldKind.NORM
    description: str
    constants: tuple[tuple[onnx.NodeProto, int], ...]  # (node, input index) of gamma, beta
    channel_axis: int
    rank: int | None

    def apply(self, ctx: FoldContext, inv_s: np.ndarray) -> None:
        for node, index in self.constants:
            ctx.scale_constant(node, index, inv_s, [node], None, self.channel_axis, self.rank)


@dataclass(frozen=True)
class LinearOutputFold:
    """X = A (.) (P W + b): divide W's output channels and b by s."""

    kind = FoldKind.LINEAR
    description: str
    producer: LinearOp
    bias: tuple[onnx.NodeProto, int] | None  # an Add's constant input, or Gemm's C

    def apply(self, ctx: FoldContext, inv_s: np.ndarray) -> None:
        node = self.producer.node
        ctx.scale_constant(node, 1, inv_s, [node], self.producer.weight_out_axis, -1, None)
        if self.bias is not None:
            bias_node, index = self.bias
            ctx.scale_constant(bias_node, index, inv_s, [bias_node], None, -1, None)


LAYOUT_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity")  # Expand: before P @ V only
SHAPE_READERS = ("Shape", "Size")  # read only a tensor's shape: X' = X / s has X's shape


@dataclass(frozen=True)
class ValuePath:
    """How an attention output projection's input X comes from the value projection V:
    X = after(MatMul(P, before(V))), ``before``/``after`` layout nodes in execution order."""

    value: LinearOutputFold  # V = Y W_v [+ b_v]
    before: tuple[onnx.NodeProto, ...]  # from V (or V + b_v) to the MatMul's second input
    matmul: onnx.NodeProto  # P @ (...)
    after: tuple[onnx.NodeProto, ...]  # from the MatMul's output to X

    @property
    def value_tensor(self) -> str:
        """The tensor the layout chain starts from (V, after its bias)."""
        return self.before[0].input[0] if self.before else self.matmul.input[1]


@dataclass(frozen=True)
class AttentionValueFold:
    """X = L2(P @ L1(V)): X's channel c carries V's column ``channel_map[c]``, so dividing that
    column of W_v (and b_v) by s_c divides X_c by s_c. Needs s equal on channels that share a
    column (grouped-query attention): :meth:`tie` equalizes their maxima before the scales are
    computed. ``channel_map`` is None until :func:`passes.value_fold.trace_value_channels`
    fills it in."""

    kind = FoldKind.LINEAR
    description: str
    path: ValuePath
    channel_map: np.ndarray | None = None

    @property
    def producer(self) -> LinearOp:
        return self.path.value.producer

    def tie(self, per_channel: np.ndarray) -> np.ndarray:
        """Per-channel values replaced by their maximum over the channels that read the same V column."""
        if self.channel_map is None:
            raise ValueError("the attention value path has not been traced")
        column_max = np.full(int(self.channel_map.max()) + 1, -np.inf)
        np.maximum.at(column_max, self.channel_map, per_channel)
        return column_max[self.channel_map]

    def apply(self, ctx: FoldContext, inv_s: np.ndarray) -> None:
        if self.channel_map is None:
            raise ValueError("the attention value path has not been traced")
        columns = _out_width(ctx.view, self.producer)
        inv_v = np.ones(columns)
        inv_v[self.channel_map] = inv_s
        if not np.allclose(inv_v[self.channel_map], inv_s, rtol=1e-12, atol=0):
            raise ValueError("channels that read one value column got different scales")
        self.path.value.apply(ctx, inv_v)


@dataclass(frozen=True)
class InsertedMul:
    """No constant absorbs 1/s: insert X_s = Mul(X, 1/s) before the group's linear ops."""

    kind = FoldKind.MUL
    reason: str  # why no constant absorbs 1/s
    activation: str
    channel_axis: int
    rank: int | None

    @property
    def description(self) -> str:
        return f"explicit Mul ({self.reason})"

    def apply(self, ctx: FoldContext, inv_s: np.ndarray) -> None:
        insert_channel_mul(ctx.view, self.activation, inv_s, self.channel_axis, self.rank, ctx.group_nodes,
                           ctx.names.smoothing_scale(self.activation), ctx.names.smoothed_tensor(self.activation),
                           ctx.names.smoothing_mul(self.activation))


def insert_channel_mul(view: GraphView, tensor: str, vector: np.ndarray, channel_axis: int, rank: int | None,
                       readers: list[onnx.NodeProto], scale_name: str, output: str, node_name: str) -> None:
    """Make ``readers`` read ``Mul(tensor, vector)`` (``vector`` per channel, in the tensor's dtype)."""
    shape = (vector.size,) if channel_axis == -1 else (vector.size,) + (1,) * (rank - 2)
    view.set_initializer(scale_name, vector.reshape(shape).astype(activation_dtype(view, tensor)))
    mul = helper.make_node("Mul", [tensor, scale_name], [output], name=node_name)
    view.graph.node.insert(min(list(view.graph.node).index(n) for n in readers), mul)
    for node in readers:
        replace_input(node, tensor, output)  # a reader's If/Loop/Scan bodies too
    view.rebuild()


FoldSite = AffineFold | LinearOutputFold | AttentionValueFold | InsertedMul


def _const_channel(view: GraphView, tensor: str, channels: int, channel_axis: int, rank: int | None) -> bool:
    value_shape = None
    source = view.constant_source(tensor)
    if source is not None:
        value_shape = tuple(view.store.proto(source).dims)
    else:
        value = view.constant_value(tensor)
        if value is not None:
            value_shape = value.shape
    return value_shape is not None and channel_shape(value_shape, channels, channel_axis, rank) is not None


def _is_scalar(view: GraphView, tensor: str) -> bool:
    source = view.constant_source(tensor)
    if source is not None:
        return int(np.prod(view.store.proto(source).dims, dtype=np.int64)) == 1
    value = view.constant_value(tensor)
    return value is not None and value.size == 1


def _describe_norm(view: GraphView, tensor: str) -> str:
    """Name the normalization that produced ``tensor`` by the ops upstream of it."""
    ops, frontier = set(), [tensor]
    for _ in range(8):
        nxt = []
        for t in frontier:
            node = view.producer.get(t)
            if node is not None:
                ops.add(node.op_type)
                nxt.extend(node.input)
        frontier = nxt
    if "ReduceMean" in ops and ops & {"Sqrt", "Reciprocal", "Div", "Rsqrt"}:
        return "LayerNorm (decomposed)" if "Sub" in ops else "RMSNorm (decomposed)"
    return "per-channel affine"


def find_fold_site(view: GraphView, activation: str, linear_by_output: dict[str, LinearOp],
                   channels: int, channel_axis: int, rank: int | None,
                   fold_scalars: bool = True, attention_values: bool = False) -> FoldSite | str:
    """The site that can absorb ``1/s`` for ``activation``, or the reason there is none; also through
    layout ops that keep the channel axis (:func:`_keeps_channels`) when ``activation`` itself has none.
    (Details: :func:`_fold_site`.)"""
    site = _fold_site(view, activation, linear_by_output, channels, channel_axis, rank, fold_scalars,
                      attention_values)
    node = view.producer.get(activation)
    if (isinstance(site, str) and node is not None and channel_axis == -1 and _keeps_channels(view, node, channels)
            and activation not in view.graph_outputs and view.exclusive(node.input[0], [node])):
        # X = Reshape/Transpose(Z) with Z's last axis kept as X's: absorb 1/s where Z's is absorbed
        inner = find_fold_site(view, node.input[0], linear_by_output, channels, channel_axis, rank, fold_scalars,
                               attention_values)
        if not isinstance(inner, (str, AttentionValueFold)):
            return inner
    return site


def _fold_site(view: GraphView, activation: str, linear_by_output: dict[str, LinearOp],
               channels: int, channel_axis: int, rank: int | None,
               fold_scalars: bool = True, attention_values: bool = False) -> FoldSite | str:
    """The site that can absorb ``1/s`` for ``activation``, or the reason there is none.

    Readers of ``activation`` outside the group are not checked here: the fold pass gives
    them ``Mul(X / s, s)`` (see :func:`passes.fold.fold_smoothing`). ``fold_scalars=False``:
    a scalar constant of a Mul (GELU's 0.5, say) is not turned into a vector, because a
    runtime matches fusion patterns on it (ONNX Runtime fuses GELU only with its scalars);
    such a group gets an explicit Mul instead. ``attention_values``: also look for
    :class:`AttentionValueFold` sites (an attention output projection's input).
    """
    if activation in view.graph_inputs:
        return f"{activation!r} is a graph input"
    if activation in view.graph_outputs:
        return f"{activation!r} is also a graph output"
    node = view.producer.get(activation)
    if node is None:
        return f"{activation!r} has no producer"
    op = node.op_type
    is_const = lambda t: _const_channel(view, t, channels, channel_axis, rank)  # noqa: E731

    if op == "LayerNormalization" and channel_axis == -1 and attribute(node, "axis", -1) == -1:
        if is_const(node.input[1]) and (len(node.input) < 3 or not node.input[2] or is_const(node.input[2])):
            consts = [(node, 1)] + ([(node, 2)] if len(node.input) > 2 and node.input[2] else [])
            return AffineFold("LayerNormalization", tuple(consts), channel_axis, rank)
    if op == "RMSNormalization" and channel_axis == -1 and attribute(node, "axis", -1) == -1 \
            and is_const(node.input[1]):  # opset 23
        return AffineFold("RMSNormalization", ((node, 1),), channel_axis, rank)
    if op == "BatchNormalization" and channel_axis == 1 and not attribute(node, "training_mode", 0):
        # scale and B are plain [C] vectors indexed by the channel axis, not broadcast: check them as 1-D
        if all(_const_channel(view, node.input[i], channels, -1, None) for i in (1, 2)):
            return AffineFold("BatchNormalization", ((node, 1), (node, 2)), -1, None)
    if op == "Add":
        for beta_idx in (0, 1):
            other = node.input[1 - beta_idx]
            mul = view.producer.get(other)
            if not is_const(node.input[beta_idx]) or mul is None or mul.op_type != "Mul":
                continue
            if not view.exclusive(other, [node]):
                continue
            for gamma_idx in (0, 1):
                if is_const(mul.input[gamma_idx]) and not is_const(mul.input[1 - gamma_idx]):
                    return AffineFold(_describe_norm(view, mul.input[1 - gamma_idx]),
                                      ((mul, gamma_idx), (node, beta_idx)), channel_axis, rank)
    if op == "Mul":
        for gamma_idx in (0, 1):
            if is_const(node.input[gamma_idx]) and not is_const(node.input[1 - gamma_idx]):
                if not fold_scalars and _is_scalar(view, node.input[gamma_idx]):
                    return InsertedMul(f"the scalar constant of {view.node_label(node)} is kept for the runtime's "
                                       f"fusions", activation, channel_axis, rank)
                return AffineFold(_describe_norm(view, node.input[1 - gamma_idx]), ((node, gamma_idx),),
                                  channel_axis, rank)
    if channel_axis == -1:
        fold = _linear_output_site(view, activation, linear_by_output, channels)
        if fold is not None:
            return fold
        if op == "Mul":
            for factor in node.input:
                if view.exclusive(factor, [node]):
                    fold = _linear_output_site(view, factor, linear_by_output, channels, "SwiGLU / gated product")
                    if fold is not None:
                        return fold
        path = _attention_value_path(view, activation, linear_by_output) if attention_values else None
        if path is not None:
            return AttentionValueFold(f"value projection {path.value.producer.name!r} (through P @ V)", path)
    return f"{activation!r} is produced by {view.node_label(node)}, which has no constant to absorb 1/s"


def _keeps_channels(view: GraphView, node: onnx.NodeProto, channels: int) -> bool:
    """``node`` is a layout op whose output's last axis is its input's (same channels, same order):
    Identity, a Transpose keeping the last axis last, a Reshape to a constant shape ending in
    ``channels`` (row-major order keeps channel ``i`` at position ``i`` of every row when both
    last dimensions are ``channels``; the input's is, for the sites found upstream)."""
    if node.op_type == "Identity":
        return True
    if node.op_type == "Transpose":
        perm = attribute(node, "perm", None)
        return perm is not None and len(perm) > 0 and perm[-1] == len(perm) - 1
    if node.op_type == "Reshape" and len(node.input) > 1:
        shape = view.constant_value(node.input[1])
        return shape is not None and shape.ndim == 1 and shape.size > 0 and int(shape[-1]) == channels
    return False


def _out_width(view: GraphView, op: LinearOp) -> int:
    return int(view.store.proto(op.weight).dims[op.weight_out_axis])


def _only_read_by(view: GraphView, tensor: str, node: onnx.NodeProto) -> bool:
    """``tensor`` is not a graph output and every reader but ``node`` reads only its shape."""
    return tensor not in view.graph_outputs and all(
        c is node or c.op_type in SHAPE_READERS for c in view.consumers.get(tensor, []))


def _attention_value_path(view: GraphView, activation: str, linear_by_output: dict[str, LinearOp]
                          ) -> ValuePath | None:
    """X = L2(MatMul(P, L1(V))) with V from a linear layer and every tensor from V to X read by the
    path alone (shape readers aside); None if ``activation`` is not such an X."""
    after, tensor = [], activation
    node = view.producer.get(tensor)
    while node is not None and node.op_type in LAYOUT_OPS and node.op_type != "Expand":
        after.append(node)
        tensor = node.input[0]
        if not _only_read_by(view, tensor, node):
            return None
        node = view.producer.get(tensor)
    if node is None or node.op_type != "MatMul" or len(node.input) != 2:
        return None
    matmul, before = node, []
    if view.constant_source(matmul.input[1]) is not None or view.constant_value(matmul.input[1]) is not None:
        return None  # a constant weight: an ordinary linear op, not P @ V
    tensor, reader = matmul.input[1], matmul
    while True:
        if not _only_read_by(view, tensor, reader):
            return None
        node = view.producer.get(tensor)
        if node is None or node.op_type not in LAYOUT_OPS:
            break
        before.append(node)
        tensor, reader = node.input[0], node
    value = _linear_output_site(view, tensor, linear_by_output, None, "value projection")
    if value is None:
        return None
    return ValuePath(value, tuple(reversed(before)), matmul, tuple(reversed(after)))


def _linear_output_site(view: GraphView, tensor: str, linear_by_output: dict[str, LinearOp], channels: int | None,
                        description: str = "preceding linear layer") -> LinearOutputFold | None:
    """``tensor`` = P W [+ b] from a MatMul/Gemm whose output nothing else reads (``channels``
    None: any width)."""
    node = view.producer.get(tensor)
    bias = None
    if node is not None and node.op_type == "Add":
        for b in (0, 1):
            inner = node.input[1 - b]
            if inner in linear_by_output and view.exclusive(inner, [node]) and _const_channel(
                    view, node.input[b], channels or _out_width(view, linear_by_output[inner]), -1, None):
                bias, tensor = (node, b), inner
                break
        else:
            return None
    op = linear_by_output.get(tensor)
    if op is None or op.activation_channel_axis != -1:
        return None
    if channels is not None and _out_width(view, op) != channels:
        return None
    channels = _out_width(view, op)
    if op.node.op_type == "Gemm" and len(op.node.input) > 2 and op.node.input[2]:
        if bias is not None or not _const_channel(view, op.node.input[2], channels, -1, None):
            return None
        bias = (op.node, 2)
    return LinearOutputFold(description, op, bias)
