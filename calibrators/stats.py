"""Per-channel activation statistics: typed, mergeable, saved as one ``.npz``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from passes.errors import SmoothQuantError

FORMAT_VERSION = 1


@dataclass
class ChannelStats:
    """``amax[tensor]`` is max|X| per channel of activation ``tensor`` over every sample seen.

    ``channel_axis[tensor]`` records which axis of the activation the vector indexes
    (-1: last, as for [B, T, C] inputs of MatMul/Gemm; 1: NCHW inputs of Conv).
    """

    amax: dict[str, np.ndarray] = field(default_factory=dict)
    channel_axis: dict[str, int] = field(default_factory=dict)
    num_samples: int = 0

    def update(self, tensor: str, values: np.ndarray, channel_axis: int) -> None:
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        old = self.amax.get(tensor)
        if old is not None and old.shape != values.shape:
            raise SmoothQuantError(
                f"statistics for tensor {tensor!r}: {values.shape[0]} channels, earlier {old.shape[0]}"
            )
        self.amax[tensor] = values.copy() if old is None else np.maximum(old, values)
        self.channel_axis[tensor] = channel_axis

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Statistics of both sample sets together (elementwise max); neither input changes."""
        out = ChannelStats(dict(self.amax), dict(self.channel_axis), self.num_samples + other.num_samples)
        for tensor, values in other.amax.items():
            if tensor in self.channel_axis and self.channel_axis[tensor] != other.channel_axis[tensor]:
                raise SmoothQuantError(f"statistics for tensor {tensor!r} disagree on the channel axis")
            out.update(tensor, values, other.channel_axis[tensor])
        return out

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        names = sorted(self.amax)
        meta = {"format": FORMAT_VERSION, "num_samples": self.num_samples, "tensors": names,
                "channel_axis": [self.channel_axis[n] for n in names]}
        arrays = {f"t{i}": self.amax[n] for i, n in enumerate(names)}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ChannelStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != FORMAT_VERSION:
                    raise SmoothQuantError(f"{path}: statistics format {meta.get('format')}, expected {FORMAT_VERSION}")
                stats = cls(num_samples=int(meta["num_samples"]))
                for i, (name, axis) in enumerate(zip(meta["tensors"], meta["channel_axis"])):
                    stats.update(name, z[f"t{i}"], int(axis))
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
