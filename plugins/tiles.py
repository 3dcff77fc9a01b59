"""GEMM tiles of the AOT ``W8A8Linear`` kernel, one per TensorRT tactic (no Triton, no TensorRT needed).

TensorRT reserves tactic 0 for a plugin's default and asks for custom tactics as positive
integers (``IPluginV3OneBuild::getValidTactics``); tactic ``i`` here is ``LINEAR_TACTICS[i - 1]``
and 0 means the first tile. The plugin's ``autotune`` advertises ``1..len(LINEAR_TACTICS)``, so
TensorRT times every tile per layer and keeps the fastest.

Shared memory: a kernel needing more than 48 KiB of dynamic shared memory must be opted in
(``cuFuncSetAttribute``) by whoever launches it. TensorRT's documentation does not say that its
AOT launcher does, so a tactic is offered only if its compiled kernel fits 48 KiB (the tile's
operand stages, and for a float32 output the epilogue's 128x128 accumulator: 64 KiB for the first
tile) unless ``SMOOTHQUANT_AOT_LARGE_SMEM=1`` is set (then the large tiles of the JIT kernel are offered too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


SMALL_TILES = (Tile(128, 128, 64, 8, 3), Tile(128, 128, 64, 4, 2), Tile(64, 128, 128, 4, 2), Tile(128, 64, 128, 4, 2),
               Tile(64, 64, 128, 4, 3))
LARGE_TILES = (Tile(128, 256, 128, 8, 3), Tile(128, 128, 128, 8, 4), Tile(256, 128, 128, 8, 3))
LINEAR_TACTICS = SMALL_TILES + (LARGE_TILES if os.environ.get("SMOOTHQUANT_AOT_LARGE_SMEM") == "1" else ())


def tactics() -> list[int]:
    """Every custom tactic: ``1..len(LINEAR_TACTICS)``."""
    return list(range(1, len(LINEAR_TACTICS) + 1))


def shared_limit() -> int | None:
    """Dynamic shared memory a tactic may use: 48 KiB, or no limit with ``SMOOTHQUANT_AOT_LARGE_SMEM=1``."""
    return None if os.environ.get("SMOOTHQUANT_AOT_LARGE_SMEM") == "1" else DEFAULT_SHARED_LIMIT


def tactic_tile(tactic: int) -> Tile:
    """TensorRT's tactic (1-based; 0 means the default, the first) as a tile of :data:`LINEAR_TACTICS`."""
    if not 0 <= tactic <= len(LINEAR_TACTICS):
        raise ValueError(f"W8A8Linear: tactic {tactic} is not one of 0..{len(LINEAR_TACTICS)}")
    return LINEAR_TACTICS[max(tactic, 1) - 1]
