"""Launch heuristics: chosen from the shapes (and, for the backward grid, a GPU's SM count), any hidden size."""

from __future__ import annotations

import pytest

from dit_fast.kernels import _row
from dit_fast.kernels._row import backward_partition, forward_config
from dit_fast.kernels.patchify import tile_config


@pytest.mark.parametrize(("dim", "head", "tail"), [(37, 32, 8), (100, 64, 64), (384, 256, 128), (768, 512, 256),
                                                   (1024, 1024, 0), (1152, 1024, 128), (4096, 4096, 0)])
def test_rows_are_a_head_and_a_tail_tile(dim, head, tail):
    """The head is the largest power of two <= D, the tail covers the rest; DiT's widths have no padding."""
    config = _row.row_config(dim, 256)
    assert (config.block_d, config.block_tail) == (head, tail)
    if dim in (384, 768, 1024, 1152):
        assert config.block_d + config.block_tail == dim


@pytest.mark.parametrize(("B", "T", "D", "expected"), [
    (32, 256, 1152, (2, 4)),  # DiT-XL/2 training: 2 rows a tile, 16 elements per thread
    (32, 256, 384, (8, 4)),  # DiT-S/2
    (2, 256, 384, (2, 1)),  # small batch: tiles shrink so that >= FWD_MIN_PROGRAMS programs run
    (2, 256, 1152, (2, 4)),
    (1, 3, 37, (1, 1)),  # (down to one row per program)
    (2, 16, 16384, (1, 8)),  # the widest rows: one per program
])
def test_forward_tiles(B, T, D, expected):
    config = forward_config(B, T, D)
    assert (config.block_m, config.num_warps) == expected


def test_backward_partition_without_a_device():
    config, n_blocks = backward_partition(32, 256, 1152)
    assert (config.block_m, config.num_warps, n_blocks) == (1, 8, 32)
    config, n_blocks = backward_partition(1, 3, 37)
    assert 1 <= n_blocks <= 3


@pytest.mark.parametrize("dim", [384, 768, 1024, 1152, 4096])
def test_backward_carries_at_most_four_columns_a_thread(dim):
    """The rows the backward carries across its loop (gate, 1 + scale, partial sums) get at most
    BWD_COLS_PER_THREAD columns per thread (D = 1152: 8 warps, not the 4 that held 9 columns a row each)."""
    config, _ = backward_partition(32, 256, dim)
    threads = 32 * config.num_warps
    assert config.num_warps == 8 or (config.block_d + config.block_tail) <= _row.BWD_COLS_PER_THREAD * threads


@pytest.mark.parametrize(("B", "T", "sm_count", "n_blocks"), [
    (32, 256, 132, 33),  # DiT-XL/2 training on an H100/H200: 1056 programs, 8 per SM
    (64, 256, 132, 33),  # 2112 programs, 16 per SM
    (8, 256, 132, 132),
    (1, 256, 132, 132),  # one wave of one program per SM
    (32, 256, 108, 27),  # A100
    (1, 16, 132, None),  # too few tokens for whole waves: the power-of-two partition
])
def test_backward_grid_is_whole_waves_on_a_gpu(B, T, sm_count, n_blocks):
    _, blocks = backward_partition(B, T, 1152, sm_count)
    if n_blocks is None:
        assert blocks == backward_partition(B, T, 1152)[1]
    else:
        assert blocks == n_blocks and (B * blocks) % sm_count == 0 and blocks <= T


@pytest.mark.parametrize(("batch", "tokens", "rows"), [(1, 7, 1), (32, 256, 8), (256, 256, 64), (4096, 1024, 128),
                                                       (2, 3, 1)])
def test_backward_rows_per_program(batch, tokens, rows):
    assert _row.bwd_rows_per_program(batch, tokens) == rows
    assert rows <= max(tokens, 1)


@pytest.mark.parametrize(("tokens", "vec", "expected"), [(256, 16, (128, 16, 4)), (256, 32, (64, 32, 4)),
                                                         (16, 512, (4, 512, 4)), (3, 5, (4, 8, 4))])
def test_patch_tiles(tokens, vec, expected):
    assert tile_config(tokens, vec) == expected


def test_rows_wider_than_the_limit_raise():
    with pytest.raises(ValueError, match="exceeds the fused kernels' limit"):
        _row.check_row_dim(_row.MAX_FUSED_DIM + 1)
