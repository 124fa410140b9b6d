"""A tie's piece of a stored tensor, read as a region of it, is the piece of the whole tensor."""

import itertools

import numpy as np

from fax.interop.hf_ties import Tie, view_ranges


def test_a_piece_read_as_a_region_is_the_piece_of_the_whole_tensor():
    stored = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # [heads x head_dim = 6, d = 8], as torch stores q_proj
    reads = []

    def read(region):
        reads.append(region)
        return stored if region is None else stored[region]

    wq = Tie(("blocks", "attn", "wq"), "q.weight", (6, 8), transpose=True)  # fax [d, heads, head_dim] = [8, 3, 2]
    fused = Tie(("blocks", "attn", "wk"), "c_attn.weight", (6, 2), cols=(2, 4), fused_width=8)  # GPT-2's column range
    for tie, unit in ((wq, (8, 3, 2)), (fused, (6, 2))):
        whole = tie.to_fax(stored, unit)
        for cuts in itertools.product(*[[slice(None), slice(0, n // 2), slice(n // 2, n)] for n in unit[:-1]]):
            reads.clear()
            np.testing.assert_array_equal(tie.piece(read, unit, cuts), whole[cuts], err_msg=str(cuts))
            assert reads[0] is not None  # a region, not the whole tensor
    # a head_dim split (never a fax layout) is not one block of the stored rows: the whole tensor is read
    reads.clear()
    cut = (slice(None), slice(None), slice(0, 1))
    np.testing.assert_array_equal(wq.piece(read, (8, 3, 2), cut), wq.to_fax(stored, (8, 3, 2))[cut])
    assert reads == [None]
    assert view_ranges((8, 6), (8, 3, 2), (slice(0, 4), slice(1, 2), slice(None))) == [slice(0, 4), slice(2, 4)]
