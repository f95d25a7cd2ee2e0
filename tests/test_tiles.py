"""Tile geometry: causal tile states, row blocks, batch-head chunks, causal masking of a tile, the dead-row guard."""

from __future__ import annotations

import torch

from noflash_core.tiles import (
    NEG_INF,
    CausalTile,
    TileMasks,
    causal_tile,
    guard_dead_rows,
    head_chunks,
    row_blocks,
    visible_keys,
    zero_dead_rows_,
)


def test_causal_tile_states():
    assert causal_tile(0, 16, 32, 48) is CausalTile.HIDDEN
    assert causal_tile(32, 48, 0, 16) is CausalTile.VISIBLE
    assert causal_tile(32, 48, 32, 48) is CausalTile.PARTIAL
    assert causal_tile(32, 48, 17, 34) is CausalTile.PARTIAL  # row 32 cannot see key 33
    assert causal_tile(32, 48, 17, 33) is CausalTile.VISIBLE  # row 32 sees keys up to 32
    assert visible_keys(48, 100, True) == 48 and visible_keys(48, 30, True) == 30
    assert visible_keys(48, 100, False) == 100


def test_row_blocks_cover_every_row_and_never_run_thin():
    assert list(row_blocks(70, 16)) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    blocks = list(row_blocks(70, 16, overlap_last=True))
    assert blocks[-1] == (54, 70) and all(i1 - i0 == 16 for i0, i1 in blocks)
    assert list(row_blocks(10, 16, overlap_last=True)) == [(0, 10)]


def test_head_chunks_are_plain_slices_covering_every_pair_once():
    for b, h, block_h in ((2, 3, 1), (2, 3, 2), (2, 3, 3), (3, 4, 9), (2, 3, 0), (1, 5, 2)):
        seen = []
        for chunk in head_chunks(b, h, block_h):
            for bi in range(b)[chunk.batch]:
                for hi in range(h)[chunk.heads]:
                    seen.append((bi, hi))
            first_b, first_h = range(b)[chunk.batch][0], range(h)[chunk.heads][0]
            assert chunk.first == first_b * h + first_h
        assert sorted(seen) == [(bi, hi) for bi in range(b) for hi in range(h)], (b, h, block_h)


def test_causal_masking_of_a_tile_matches_tril():
    masks = TileMasks(None, True, torch.float32)
    full = torch.zeros(40, 50)
    full.masked_fill_(torch.ones(40, 50, dtype=torch.bool).tril().logical_not(), NEG_INF)
    for i0, i1, j0, j1 in ((0, 16, 0, 32), (16, 32, 0, 32), (16, 32, 32, 50), (32, 40, 16, 48), (0, 16, 32, 48)):
        tile = torch.zeros(1, 1, 1, i1 - i0, j1 - j0)
        masks.apply(tile, i0, i1, j0, j1)
        assert torch.equal(tile[0, 0, 0], full[i0:i1, j0:j1]), (i0, i1, j0, j1)


def test_dead_row_guards():
    row_max = torch.tensor([[1.0], [NEG_INF]])
    assert guard_dead_rows(row_max, NEG_INF, 0.0).tolist() == [[1.0], [0.0]]
    assert guard_dead_rows(torch.tensor([2.0, 0.0]), 0.0, 1.0).tolist() == [2.0, 1.0]
    out = torch.full((2, 3), float("nan"))
    assert zero_dead_rows_(out, row_max)[1].tolist() == [0.0, 0.0, 0.0] and out[0].isnan().all()
