"""Launch heuristics: chosen from the shapes alone (no device queries), covering any hidden size."""

from __future__ import annotations

import pytest

from dit_fast.kernels import _common
from dit_fast.kernels._row import backward_partition, forward_config
from dit_fast.kernels.patchify import tile_config


@pytest.mark.parametrize(("dim", "head", "tail"), [(37, 32, 8), (100, 64, 64), (384, 256, 128), (768, 512, 256),
                                                   (1024, 1024, 0), (1152, 1024, 128), (4096, 4096, 0)])
def test_rows_are_a_head_and_a_tail_tile(dim, head, tail):
    """The head is the largest power of two <= D, the tail covers the rest; DiT's widths have no padding."""
    config = _common.row_config(dim, 256)
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


def test_backward_partition():
    config, rows, n_blocks = backward_partition(32, 256, 1152)
    assert (config.block_m, config.num_warps, rows, n_blocks) == (1, 4, 8, 32)
    config, rows, _ = backward_partition(1, 3, 37)
    assert rows % config.block_m == 0


@pytest.mark.parametrize(("batch", "tokens", "rows"), [(1, 7, 1), (32, 256, 8), (256, 256, 64), (4096, 1024, 128),
                                                       (2, 3, 1)])
def test_backward_rows_per_program(batch, tokens, rows):
    assert _common.bwd_rows_per_program(batch, tokens) == rows
    assert rows <= max(tokens, 1)


@pytest.mark.parametrize(("tokens", "vec", "expected"), [(256, 16, (128, 16, 4)), (256, 32, (64, 32, 4)),
                                                         (16, 512, (4, 512, 4)), (3, 5, (4, 8, 4))])
def test_patch_tiles(tokens, vec, expected):
    assert tile_config(tokens, vec) == expected


def test_rows_wider_than_the_limit_raise():
    with pytest.raises(ValueError, match="exceeds the fused kernels' limit"):
        _common.check_row_dim(_common.MAX_FUSED_DIM + 1)
