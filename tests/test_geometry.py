import pytest

from lightning_lrcnn.geometry import RowInterval, same_padding, split_padding, transposed_input_rows, window_input_rows


def test_interval_basics() -> None:
    a, b = RowInterval(2, 5), RowInterval(4, 9)
    assert len(a) == 3 and not a.empty and RowInterval(3, 3).empty and len(RowInterval(5, 2)) == 0
    assert a.hull(b) == RowInterval(2, 9) and a.hull(RowInterval(7, 7)) == a
    assert RowInterval(-2, 12).clamp(10) == RowInterval(0, 10)
    # rows wholly in the padding (a 1x1 convolution padded by 3): empty at the nearer edge, sliceable
    assert RowInterval(4, 6).clamp(3) == RowInterval(3, 3) and RowInterval(-5, -2).clamp(3) == RowInterval(0, 0)
    assert b.contains(RowInterval(5, 9)) and not b.contains(a) and a.contains(RowInterval(0, 0))


@pytest.mark.parametrize(("k", "s", "p", "d"), [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (3, 1, 2, 2), (1, 2, 0, 1)])
def test_window_rows_match_brute_force(k: int, s: int, p: int, d: int) -> None:
    for a in range(0, 6):
        for b in range(a + 1, 8):
            rows = {o * s - p + d * j for o in range(a, b) for j in range(k)}
            assert window_input_rows(RowInterval(a, b), k, s, p, d) == RowInterval(min(rows), max(rows) + 1)


@pytest.mark.parametrize(("k", "s", "p", "d"), [(4, 2, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 1, 2), (5, 3, 2, 1)])
def test_transposed_rows_cover_every_contribution(k: int, s: int, p: int, d: int) -> None:
    h = 6
    for a in range(0, 10):
        for b in range(a + 1, 12):
            got = transposed_input_rows(RowInterval(a, b), k, s, p, d, h)
            contributing = {i for i in range(h) for j in range(k) if a <= i * s - p + d * j < b}
            assert not got.empty and got.start >= 0 and got.stop <= h
            if contributing:  # every writer is read; extra rows only write outside the band (cropped)
                assert got.contains(RowInterval(min(contributing), max(contributing) + 1))
                assert len(got) <= len(RowInterval(min(contributing), max(contributing) + 1)) + d * (k - 1)


def test_same_padding_and_split() -> None:
    assert same_padding(3, 1) == (1, 1) and same_padding(4, 1) == (1, 2) and same_padding(3, 2) == (2, 2)
    assert split_padding(RowInterval(-2, 5), 10) == (RowInterval(0, 5), 2, 0)
    assert split_padding(RowInterval(7, 12), 10) == (RowInterval(7, 10), 0, 2)
    assert split_padding(RowInterval(-3, 12), 10) == (RowInterval(0, 10), 3, 2)


def test_a_window_wholly_in_the_padding_has_as_many_padding_rows_as_rows() -> None:
    inside, top, bottom = split_padding(RowInterval(-2, -1), 10)
    assert inside.empty and (top, bottom) == (1, 0)
    inside, top, bottom = split_padding(RowInterval(11, 13), 10)
    assert inside.empty and (top, bottom) == (0, 2)


def test_band_count_gives_bands_of_the_target_size() -> None:
    from lightning_lrcnn.planner import band_count

    assert band_count(100, 1000, 64) == 10  # bands of the target bytes
    assert band_count(100, 1001, 64) == 11  # rounded up: no band above the target
    assert band_count(100, 50, 64) == 1  # a small segment: one band
    assert band_count(100, 10_000, 7) == 7  # at most one band per output row
    assert band_count(0, 10, 3) == 3  # a zero target cannot divide by zero
