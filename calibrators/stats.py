"""Per-channel activation statistics: typed, mergeable, saved as one ``.npz``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from passes.ir.atomic import atomic_write
from passes.ir.errors import SmoothQuantError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: abs-max only


@dataclass
class ChannelStats:
    """``amax[tensor]`` is max|X| per channel of activation ``tensor`` over every sample seen.

    ``minimum[tensor]`` / ``maximum[tensor]`` are the signed per-channel extremes (for
    asymmetric activation ranges); absent for statistics saved by format 1.

    ``channel_axis[tensor]`` records which axis of the activation the vector indexes
    (-1: last, as for [B, T, C] inputs of MatMul/Gemm; 1: NCHW inputs of Conv).
    """

    amax: dict[str, np.ndarray] = field(default_factory=dict)
    channel_axis: dict[str, int] = field(default_factory=dict)
    num_samples: int = 0
    minimum: dict[str, np.ndarray] = field(default_factory=dict)
    maximum: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, tensor: str, values: np.ndarray, channel_axis: int, *,
               minimum: np.ndarray | None = None, maximum: np.ndarray | None = None) -> None:
        """Merge one batch: abs-max ``values`` and optionally the signed extremes (all ``[C]``)."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        old = self.amax.get(tensor)
        if old is not None and old.shape != values.shape:
            raise SmoothQuantError(
                f"statistics for tensor {tensor!r}: {values.shape[0]} channels, earlier {old.shape[0]}"
            )
        first = old is None
        self.amax[tensor] = values.copy() if first else np.maximum(old, values)
        self.channel_axis[tensor] = channel_axis
        if minimum is None or maximum is None or (not first and tensor not in self.minimum):
            self.minimum.pop(tensor, None)  # signed range unknown for part of the samples
            self.maximum.pop(tensor, None)
            return
        minimum = np.asarray(minimum, dtype=np.float32).reshape(values.shape)
        maximum = np.asarray(maximum, dtype=np.float32).reshape(values.shape)
        self.minimum[tensor] = minimum.copy() if first else np.minimum(self.minimum[tensor], minimum)
        self.maximum[tensor] = maximum.copy() if first else np.maximum(self.maximum[tensor], maximum)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Statistics of both sample sets together (elementwise extremes); neither input changes."""
        out = ChannelStats(dict(self.amax), dict(self.channel_axis), self.num_samples + other.num_samples,
                           dict(self.minimum), dict(self.maximum))
        for tensor, values in other.amax.items():
            if tensor in self.channel_axis and self.channel_axis[tensor] != other.channel_axis[tensor]:
                raise SmoothQuantError(f"statistics for tensor {tensor!r} disagree on the channel axis")
            out.update(tensor, values, other.channel_axis[tensor],
                       minimum=other.minimum.get(tensor), maximum=other.maximum.get(tensor))
        return out

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        names = sorted(self.amax)
        meta = {"format": FORMAT_VERSION, "num_samples": self.num_samples, "tensors": names,
                "channel_axis": [self.channel_axis[n] for n in names]}
        arrays = {f"t{i}": self.amax[n] for i, n in enumerate(names)}
        arrays.update({f"min{i}": self.minimum[n] for i, n in enumerate(names) if n in self.minimum})
        arrays.update({f"max{i}": self.maximum[n] for i, n in enumerate(names) if n in self.maximum})
        with atomic_write(path) as (tmp,), tmp.open("wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ChannelStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") not in READABLE_VERSIONS:
                    raise SmoothQuantError(f"{path}: statistics format {meta.get('format')}, expected one of "
                                           f"{READABLE_VERSIONS}")
                stats = cls(num_samples=int(meta["num_samples"]))
                for i, (name, axis) in enumerate(zip(meta["tensors"], meta["channel_axis"])):
                    signed = f"min{i}" in z.files and f"max{i}" in z.files
                    stats.update(name, z[f"t{i}"], int(axis), minimum=z[f"min{i}"] if signed else None,
                                 maximum=z[f"max{i}"] if signed else None)
                return stats
        except SmoothQuantError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise SmoothQuantError(f"{path}: not a statistics file written by --stats-out ({e})") from None

    @classmethod
    def merge_files(cls, paths: list[str | os.PathLike]) -> ChannelStats:
        stats = cls()
        for p in paths:
            stats = stats.merge(cls.load(p))
        return stats
