"""Launch heuristics: chosen from the shapes alone (no device queries), covering any hidden size."""

from __future__ import annotations

import pytest

from dit_fast.kernels import _common
from dit_fast.kernels.patchify import tile_config


@pytest.mark.parametrize(("dim", "expected"), [(37, (64, 1)), (100, (128, 1)), (384, (512, 2)), (768, (1024, 4)),
                                               (1024, (1024, 4)), (1152, (2048, 8)), (4096, (4096, 8))])
def test_row_config(dim, expected):
    assert _common.row_config(dim) == expected


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
