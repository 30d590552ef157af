"""The pure rules of the search: how many units a ratio removes, the candidate window, tie-breaking."""

import pytest

from finercut.candidates import (
    Unit,
    all_units,
    first_window_block,
    removed_sublayers,
    select_least,
    step_candidates,
    target_count,
    window_applies,
)


@pytest.mark.parametrize(
    "ratio, units, expected",
    [(0.25, 60, 15), (0.1, 30, 3), (0.4, 64, 26), (0.125, 20, 3), (0.1, 60, 6), (0.3, 10, 3), (0.05, 8, 0)],
)
def test_target_count_rounds_half_up(ratio, units, expected):
    assert target_count(ratio, units) == expected


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_target_count_rejects_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        target_count(ratio, 60)


def test_units_in_search_order():
    assert [str(u) for u in all_units(2, "sublayer")] == ["0.attn", "0.ffn", "1.attn", "1.ffn"]
    assert [str(u) for u in all_units(2, "block")] == ["0.block", "1.block"]
    expanded = [Unit(1, "attention"), Unit(1, "ffn"), Unit(0, "ffn")]
    assert removed_sublayers([Unit(1, "block"), Unit(0, "ffn")]) == expanded


def test_window_is_last_60_percent_of_blocks_until_40_percent_removed():
    assert first_window_block(30, 0.4) == 12  # blocks 12..29: the last 60%
    assert first_window_block(32, 0.4) == 13  # ceil(12.8)
    assert first_window_block(80, 0.4) == 32
    assert window_applies(24, 60, 0.4)  # 24 <= 0.4 * 60
    assert not window_applies(25, 60, 0.4)


def test_step_candidates_follow_the_window_then_widen():
    units = all_units(5, "sublayer")
    windowed, first = step_candidates(units, removed_so_far=0, total_units=10, window_until_ratio=0.4,
                                      window_first_block=2)
    assert first == 2 and [str(u) for u in windowed] == ["2.attn", "2.ffn", "3.attn", "3.ffn", "4.attn", "4.ffn"]
    widened, first = step_candidates(units, removed_so_far=5, total_units=10, window_until_ratio=0.4,
                                     window_first_block=2)
    assert first == 0 and widened == units


def test_step_candidates_fall_back_to_all_when_window_is_exhausted():
    remaining = [Unit(0, "attention"), Unit(0, "ffn")]
    candidates, first = step_candidates(remaining, removed_so_far=1, total_units=4, window_until_ratio=0.5,
                                        window_first_block=1)
    assert candidates == remaining and first == 0


def test_select_least_prefers_smallest_then_earliest_block_then_attention():
    scored = [(Unit(3, "ffn"), 0.2), (Unit(2, "ffn"), 0.1), (Unit(2, "attention"), 0.1), (Unit(1, "ffn"), 0.3)]
    assert select_least(scored) == (Unit(2, "attention"), 0.1)
    assert select_least(list(reversed(scored))) == (Unit(2, "attention"), 0.1)
    assert select_least([(Unit(5, "attention"), 0.0), (Unit(4, "ffn"), 0.0)]) == (Unit(4, "ffn"), 0.0)


def test_unit_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown unit kind"):
        Unit(0, "mlp")
