"""PositionSet / ImagePositions algebra, independent of any model."""

import pytest
import torch

from tl_vlm.core.positions import ImagePositions, PositionSet


def test_compose_union_difference_intersection():
    a = PositionSet.from_lists([[0, 1, 2], [3]], seq_len=5)
    b = PositionSet.from_lists([[2, 4], [3, 4]], seq_len=5)
    assert (a | b).tolist() == [[0, 1, 2, 4], [3, 4]]
    assert (a - b).tolist() == [[0, 1], []]
    assert (a & b).tolist() == [[2], [3]]
    assert (a | b).counts.tolist() == [4, 2]


def test_random_is_seeded_per_row_and_inside_the_set():
    s = PositionSet.from_lists([list(range(2, 12)), list(range(5, 9))], seq_len=12)
    r1, r2, r3 = s.random(3, seed=7), s.random(3, seed=7), s.random(3, seed=8)
    assert r1 == r2 and r1 != r3
    assert r1.counts.tolist() == [3, 3]
    assert ((r1 - s).is_empty())


def test_bad_input_is_refused_clearly():
    with pytest.raises(IndexError, match="outside the sequence"):
        PositionSet.from_lists([[0, 7]], seq_len=5)
    with pytest.raises(ValueError, match="different batches"):
        PositionSet.empty(2, 5) | PositionSet.empty(1, 5)
    with pytest.raises(ValueError, match="only 2"):
        PositionSet.from_lists([[0, 1]], seq_len=3).random(3)
    with pytest.raises(ValueError, match="boolean mask"):
        PositionSet(torch.zeros(2, 3))
    with pytest.raises(TypeError):
        PositionSet.empty(1, 3) | [0, 1]


def _example() -> ImagePositions:
    # row 0 (left-padded by 2): pad pad BOS BOI i i i i EOI t t ; row 1: BOS BOI i i i i EOI t pad pad pad
    seq = 11
    f = lambda rows: PositionSet.from_lists(rows, seq)  # noqa: E731
    return ImagePositions(
        boi=f([[3], [1]]), image=f([[4, 5, 6, 7], [2, 3, 4, 5]]), eoi=f([[8], [6]]),
        row_breaks=f([[], []]), specials=f([[], []]), gate=f([[8], [6]]),
        padding=f([[0, 1], [8, 9, 10]]),
        grid=(torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]),) * 2,
    )


def test_derived_sets():
    pos = _example()
    assert pos.text.tolist() == [[2, 9, 10], [0, 7]]
    assert pos.last.tolist() == [[10], [7]]
    assert pos.after_image.tolist() == [[9, 10], [7]]
    assert pos.last_image.tolist() == [[7], [5]]
    assert pos.first_image.tolist() == [[4], [2]]
    two = ImagePositions(**{**{f: getattr(pos, f) for f in ("boi", "image", "eoi", "row_breaks",
                                                            "specials", "gate", "padding")},
                            "grid": (torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]),) * 2})
    assert two.first_image.tolist() == [[4, 6], [2, 4]] and two.last_image.tolist() == [[5, 7], [3, 5]]
    assert pos.image_side.tolist() == [[3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]
    assert pos.all.counts.tolist() == [9, 8]
    assert pos.n_images(0) == 1


def test_select_and_pad_to_for_generation():
    pos = _example()
    one = pos.select([1])
    assert one.image.tolist() == [[2, 3, 4, 5]] and len(one.grid) == 1
    grown = pos.pad_to(13)
    assert grown.seq_len == 13
    assert grown.text.tolist() == [[2, 9, 10, 11, 12], [0, 7, 11, 12]]
    with pytest.raises(ValueError, match="shrink"):
        pos.pad_to(5)
