"""coun_tune.stats against answers computed by hand (and Student-t table values), not against
the code under test."""

import math

import pytest

from coun_tune.stats import holm, paired_t, sample_std, t_critical, t_interval


def test_t_critical_matches_the_table():
    # Student-t two-sided 95% quantiles from a printed table: df 2 -> 4.303, df 3 -> 3.182, df 7 -> 2.365
    assert t_critical(3) == pytest.approx(4.302653, abs=1e-5)
    assert t_critical(4) == pytest.approx(3.182446, abs=1e-5)
    assert t_critical(8) == pytest.approx(2.364624, abs=1e-5)
    assert math.isnan(t_critical(1))


def test_t_interval_by_hand():
    # values 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5;
    # sample variance 5 / 3, s = 1.290994; se = s / 2 = 0.645497;
    # t_{0.975, 3} = 3.182446 -> half width 3.182446 * 0.645497 = 2.054260 -> [0.445740, 4.554260]
    iv = t_interval([1, 2, 3, 4])
    assert iv.mean == pytest.approx(2.5)
    assert iv.std == pytest.approx(1.290994, abs=1e-6)
    assert iv.n == 4
    assert iv.lo == pytest.approx(0.445740, abs=1e-5)
    assert iv.hi == pytest.approx(4.554260, abs=1e-5)
    assert iv.half_width == pytest.approx(2.054260, abs=1e-5)


def test_sample_std_is_ddof_1_not_the_population_std():
    # 0 and 2: mean 1, squared deviations 1 + 1 = 2; ddof 1 -> sqrt(2 / 1) = 1.414214
    # (the population std would be sqrt(2 / 2) = 1)
    assert sample_std([0, 2]) == pytest.approx(1.414214, abs=1e-6)
    assert math.isnan(sample_std([3.0]))
    one = t_interval([3.0])
    assert one.mean == 3.0 and math.isnan(one.lo) and math.isnan(one.hi)


def test_paired_t_three_pairs_by_hand():
    # a = 3, 5, 7 and b = 1, 2, 4 -> differences d = 2, 3, 3
    # mean d = 8/3 = 2.666667; deviations -2/3, 1/3, 1/3, squares 4/9 + 1/9 + 1/9 = 2/3
    # sample variance (2/3) / 2 = 1/3, s_d = 0.577350; se = s_d / sqrt(3) = 1/3
    # t = (8/3) / (1/3) = 8.0, df 2; for df 2 the two-sided p has the closed form
    # p = 1 - t / sqrt(t^2 + 2) = 1 - 8 / sqrt(66) = 1 - 0.984732 = 0.015268
    # 95% CI: 8/3 +- 4.302653 / 3 = 2.666667 +- 1.434218 -> [1.232449, 4.100884]
    r = paired_t([3, 5, 7], [1, 2, 4])
    assert r.n == 3
    assert r.mean_diff == pytest.approx(2.666667, abs=1e-6)
    assert r.std_diff == pytest.approx(0.577350, abs=1e-6)
    assert r.t == pytest.approx(8.0)
    assert r.p == pytest.approx(0.015268, abs=1e-5)
    assert r.lo == pytest.approx(1.232449, abs=1e-5)
    assert r.hi == pytest.approx(4.100884, abs=1e-5)
    assert not r.spans_zero


def test_paired_t_is_paired_not_two_sample():
    # Split difficulty varies a lot (b = 0, 10, 20) but a is always b + 1 +- a little:
    # a = 1.5, 10.5, 22 -> d = 1.5, 0.5, 2; mean 4/3 = 1.333333;
    # deviations 1/6, -5/6, 2/3: squares 1/36 + 25/36 + 16/36 = 42/36; variance 21/36 = 0.583333
    # s_d = 0.763763, se = 0.440959, t = 1.333333 / 0.440959 = 3.023716;
    # p (df 2) = 1 - t / sqrt(t^2 + 2) = 1 - 3.023716 / sqrt(11.142857) = 1 - 0.905822 = 0.094178
    # CI: 1.333333 +- 4.302653 * 0.440959 = 1.333333 +- 1.897294 -> [-0.563961, 3.230627]: spans 0
    r = paired_t([1.5, 10.5, 22], [0, 10, 20])
    assert r.t == pytest.approx(3.023716, abs=1e-5)
    assert r.p == pytest.approx(0.094178, abs=1e-5)
    assert r.lo == pytest.approx(-0.563961, abs=1e-5)
    assert r.hi == pytest.approx(3.230627, abs=1e-5)
    assert r.spans_zero
    # the sign follows a - b
    assert paired_t([0, 10, 20], [1.5, 10.5, 22]).mean_diff == pytest.approx(-1.333333, abs=1e-6)


def test_paired_t_degenerate_differences():
    same = paired_t([1, 2, 3], [1, 2, 3])
    assert same.mean_diff == 0 and same.p == 1.0 and same.spans_zero
    shifted = paired_t([2, 3, 4], [1, 2, 3])
    assert shifted.mean_diff == 1 and shifted.p == 0.0 and shifted.t == math.inf and not shifted.spans_zero
    with pytest.raises(ValueError):
        paired_t([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        paired_t([1], [2])


def test_holm_by_hand():
    # p = 0.01, 0.04, 0.03 (m = 3): sorted 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04
    # -> running max 0.03, 0.06, 0.06 -> in the given order 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1: 0.5 * 2 = 1.0, 0.6 * 1 -> max(1.0, 0.6) = 1.0
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
