"""Launch geometry of the Triton kernels: block sizes, grid and loop bounds of a ``(N, C, L)`` tensor."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch
import triton
from torch import Tensor

# Element-tile sizes. The interpreter runs one numpy operation per block
# operation, so large tiles amortise its per-operation overhead. On a GPU the
# K_PAD values per element live in registers: the tile shrinks as K grows, and
# by half again when channels are the innermost axis (each thread then also
# holds the per-(k, c) constants of several channels). These keep the heaviest
# kernel (training backward) at <= 255 registers without spills on sm_90.
_INTERPRETER_TILE = 16384
_GPU_COMPONENT_VALUES_PER_TILE = 4096
_GPU_MAX_TILE = 2048
# Channels per tile when channels are the innermost axis (channels_last,
# (N, C) input): 32 float32 values fill a 128-byte memory transaction.
_GPU_CHANNEL_BLOCK = 32
# With L-contiguous data and a small L, several channels share a tile so that
# each run of consecutive addresses (BLOCK_C * L elements) is at least this long.
_MIN_CONTIGUOUS_RUN = 128
# Programs per channel tile under the interpreter: more than one exercises the
# cross-program merge, more would only slow the interpreter down.
_INTERPRETER_PROGRAMS = 2
_GPU_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class TileGeometry:
    """How a ``(N, C, L)`` tensor is cut into tiles and programs.

    Block sizes depend on ``C``, ``L``, the layout, ``K`` and the device, never
    on ``N``: a new batch size changes only the (runtime) program count and loop
    bounds, so it reuses the compiled kernels.
    """

    block_c: int
    block_n: int
    block_l: int
    c_tiles: int
    l_tiles: int
    m_tiles: int
    programs: int
    tiles_per_program: int
    num_warps: int

    @property
    def grid(self) -> Tuple[int, int]:
        # Channel tiles on axis 0, whose limit is 2**31 - 1 (axes 1 and 2 stop at
        # 65535); programs per channel tile are a few per SM, far below that.
        return (self.c_tiles, self.programs)

    def kernel_args(self) -> Tuple[int, int, int]:
        return (self.m_tiles, self.l_tiles, self.tiles_per_program)

    def kernel_meta(self) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_N=self.block_n, BLOCK_L=self.block_l, num_warps=self.num_warps)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fit_block(extent: int, cap: int) -> int:
    """A power-of-two block for an axis of length ``extent``, at most ``cap``.

    The largest one whose padding (``cdiv(extent, b) * b - extent``) is at most
    1/8 of ``extent``, looking down to an eighth of the largest candidate;
    otherwise the least-padded of those. E.g. L = 36*36 = 1296 with cap 1024
    gets 128 (1408 lanes, 8% masked) rather than 1024 (2048 lanes, 37% masked).
    """
    largest = min(triton.next_power_of_2(max(extent, 1)), cap)
    best = block = largest
    while block >= max(1, largest // 8):
        padded = cdiv(extent, block) * block
        if 8 * padded <= 9 * extent:
            return block
        if padded < cdiv(extent, best) * best:
            best = block
        block //= 2
    return best


@functools.lru_cache(maxsize=None)
def _gpu_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_geometry(x3: Tensor, num_components: int) -> TileGeometry:
    """Block sizes, grid and loop bounds for the kernels on ``x3`` of shape ``(N, C, L)``."""
    N, C, L = x3.shape
    k_pad = triton.next_power_of_2(num_components)
    on_gpu = x3.device.type == "cuda"
    _, stride_c, stride_l = x3.stride()
    channels_innermost = stride_c == 1 and (L == 1 or stride_l != 1)
    if on_gpu:
        tile = min(_GPU_MAX_TILE, _GPU_COMPONENT_VALUES_PER_TILE // k_pad)
        tile //= 2 if channels_innermost else 1
        # At least 8 elements per channel: at K = 16 a 32-channel tile spills.
        channel_cap = min(_GPU_CHANNEL_BLOCK, tile // 8)
    else:
        tile = channel_cap = _INTERPRETER_TILE
    if channels_innermost:
        block_c = _fit_block(C, min(channel_cap, tile))
        block_l = _fit_block(L, tile // block_c)
    else:
        block_l = _fit_block(L, tile)
        block_c = _fit_block(C, max(1, _MIN_CONTIGUOUS_RUN // block_l))
        if on_gpu and block_c > 1 and k_pad >= 8:
            # The backward's ~10 K per-(k, c) constants of several channels per
            # thread: at K = 8 a full tile spills (as channels_last would, above).
            tile //= 2
    block_n = max(1, tile // (block_c * block_l))
    l_tiles = cdiv(L, block_l)
    c_tiles = cdiv(C, block_c)
    m_tiles = cdiv(N, block_n) * l_tiles
    if on_gpu:
        target = cdiv(_GPU_PROGRAMS_PER_SM * _gpu_sm_count(x3.device.index or 0), c_tiles)
    else:
        target = _INTERPRETER_PROGRAMS
    programs = max(1, min(m_tiles, target))
    tiles_per_program = cdiv(m_tiles, programs)
    programs = max(1, cdiv(m_tiles, max(1, tiles_per_program)))
    num_warps = 8 if tile >= 256 else 4
    return TileGeometry(block_c, block_n, block_l, c_tiles, l_tiles, m_tiles, programs, tiles_per_program, num_warps)

