"""Names of everything the passes insert into a graph, made in one place.

Inserted names carry the ``sq`` marker so a reader of the output graph can tell them
apart; :func:`unique` keeps them from colliding with names already in the model.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "sq"


class NameFactory:
    """Hands out names not yet used in a graph."""

    def __init__(self, taken: Iterable[str]):
        self._taken = set(taken)

    @classmethod
    def for_graph(cls, graph) -> NameFactory:
        """Names not used anywhere in ``graph`` (a GraphProto), its If/Loop/Scan bodies included."""
        from passes.ir.graph import graph_names  # noqa: PLC0415 - graph imports nothing of naming

        return cls(graph_names(graph))

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name

    # Calibration (temporary graph, never written to the output).
    def amax_output(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_amax::{tensor}")

    def amax_node(self, tensor: str, step: str) -> str:
        return self.unique(f"{PREFIX}_calib::{tensor}::{step}")

    def gram_output(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_gram::{tensor}")

    # Tracing attention value paths (temporary graph, never written to the output).
    def trace_shape(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_trace_shape::{tensor}")

    def trace_node(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_trace::{tensor}")

    # Untying transposed constant weights (tied embeddings).
    def transposed_constant(self, original: str) -> str:
        return self.unique(f"{original}.{PREFIX}_transposed")

    # Smoothing.
    def cloned_constant(self, original: str) -> str:
        return self.unique(f"{original}.{PREFIX}_smoothed")

    def smoothing_scale(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_inv_scale::{tensor}")

    def smoothing_mul(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_smooth::{tensor}")

    def smoothed_tensor(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_smoothed")

    # Compensation for readers of a smoothed tensor outside its group.
    def restore_scale(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_restore_scale")

    def restored_tensor(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_restored")

    def restore_mul(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_restore::{tensor}")

    # Outlier-channel split (passes.split).
    def outlier_index(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_outlier_index")

    def outlier_channels(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_outlier_channels")

    def outlier_gather(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_outlier_gather::{tensor}")

    def masked_weight(self, weight: str) -> str:
        return self.unique(f"{weight}.{PREFIX}_outliers_masked")

    def outlier_weight(self, weight: str) -> str:
        return self.unique(f"{weight}.{PREFIX}_outlier_rows")

    def partial_output(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_without_outliers")

    def outlier_product(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_outlier_product")

    def outlier_matmul(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_outlier_matmul::{tensor}")

    def outlier_add(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_outlier_add::{tensor}")

    # Quantization.
    def q_node(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_q::{tensor}")

    def dq_node(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_dq::{tensor}")

    def quantized(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_quantized")

    def dequantized(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_dequantized")

    def scale(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_scale")

    def shift(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_shift")

    def shifted(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_shifted")

    def shift_node(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_shift::{tensor}")

    def unshifted(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_before_shift_correction")

    def shift_correction(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_shift_correction")

    def shift_correction_node(self, tensor: str) -> str:
        return self.unique(f"{PREFIX}_shift_correction::{tensor}")

    def zero_point(self, tensor: str) -> str:
        return self.unique(f"{tensor}.{PREFIX}_zero_point")
