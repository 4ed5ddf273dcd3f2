import numpy as np
import pytest

from heterofl_edge.assignment import Assignment, parse_mode
from heterofl_edge.errors import ConfigError
from heterofl_edge.levels import Level, parse_rate, scaled_width


def test_levels_are_the_paper_rates():
    assert [lvl.rate for lvl in Level] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert parse_rate("d") == 0.125 == parse_rate(Level.d)
    assert parse_rate("0.3") == 0.3 and parse_rate(1) == 1.0


@pytest.mark.parametrize("bad", ["f", "0", "1.5", "-0.2", "nan", "inf", "", "a1"])
def test_bad_levels_are_rejected_with_a_hint(bad):
    with pytest.raises(ConfigError) as info:
        parse_rate(bad)
    assert info.value.hint


def test_hidden_sizes_are_ceil_rate_times_width():
    assert [scaled_width(64, lvl.rate) for lvl in Level] == [64, 32, 16, 8, 4]
    assert scaled_width(10, 0.3) == 3  # not 4 through floating-point noise
    assert scaled_width(10, 0.01) == 1


def test_fix_mode_assigns_proportions_in_client_order():
    mix = parse_mode("a2-b8")
    assert mix.assignment is Assignment.fix
    rates = mix.fixed_rates(100)
    assert rates[:20] == [1.0] * 20 and rates[20:] == [0.5] * 80
    assert parse_mode("a1-e1").fixed_rates(5) == [1.0, 1.0, 0.0625, 0.0625, 0.0625]


def test_dynamic_mode_draws_uniformly_each_round():
    mix = parse_mode("a-b-c-d-e")
    assert mix.assignment is Assignment.dynamic and mix.name == "a-b-c-d-e"
    draws = mix.draw_rates(50_000, np.random.default_rng(0))
    shares = [draws.count(r) / len(draws) for r in mix.rates]
    assert max(abs(s - 0.2) for s in shares) < 0.01
    assert mix.global_rate == 1.0
    assert parse_mode("b-e").global_rate == 0.5


def test_rates_and_overrides():
    mix = parse_mode("0.3x1-e3", assignment="dynamic")
    assert mix.rates == (0.3, 0.0625) and mix.weights == (1, 3)
    assert parse_mode("a").assignment is Assignment.fix
    assert parse_mode("a-e", Assignment.fix).fixed_rates(4) == [1.0, 1.0, 0.0625, 0.0625]


@pytest.mark.parametrize(
    "bad",
    ["", "a_b", "a-f", "a2-b", "a-a", "a0-b1", "a-1.5", "fix_a2-b8", "1_100_0.1_iid_fix_a2-b8"],
)
def test_bad_mode_strings_are_rejected_with_a_clear_message(bad):
    with pytest.raises(ConfigError) as info:
        parse_mode(bad)
    assert "mode" in str(info.value) or "rate" in str(info.value) or "level" in str(info.value)
    assert info.value.hint
