"""Moments from the sliding window equal Adam's recursive moments on the same sparse rows."""

import torch

from microadam.compress import window_ages, window_direction


def test_ages_follow_the_ring_buffer():
    assert window_ages(1, 4) == [0]
    assert window_ages(3, 4) == [2, 1, 0]
    assert window_ages(5, 4) == [0, 3, 2, 1]  # row 0 was just rewritten
    assert window_ages(8, 4) == [3, 2, 1, 0]


def test_direction_equals_adam_on_the_window_rows():
    torch.manual_seed(0)
    length, m, steps = 50, 4, 7
    b1, b2, eps = 0.9, 0.99, 1e-8
    idx = torch.zeros(m, 10, dtype=torch.int16)
    val = torch.zeros(m, 10, dtype=torch.float64)
    dense_rows = []
    for t in range(1, steps + 1):
        r = (t - 1) % m
        idx[r] = torch.randperm(length)[:10].sort().values.to(torch.int16)
        val[r] = torch.randn(10, dtype=torch.float64)
        dense = torch.zeros(length, dtype=torch.float64)
        dense[idx[r].long()] = val[r]
        dense_rows.append(dense)
    rows = min(steps, m)
    u = window_direction(
        idx[:rows],
        val[:rows],
        torch.zeros(10, dtype=torch.int64),
        length,
        steps,
        m,
        (b1, b2),
        eps,
        torch.float64,
    )
    # Adam's EMA over the last m sparse gradients only (older ones have left the window).
    exp_avg = torch.zeros(length, dtype=torch.float64)
    exp_avg_sq = torch.zeros(length, dtype=torch.float64)
    for dense in dense_rows[-m:]:
        exp_avg = b1 * exp_avg + (1 - b1) * dense
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * dense**2
    expected = (exp_avg / (1 - b1**steps)) / ((exp_avg_sq / (1 - b2**steps)).sqrt() + eps)
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=0)
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[idx.long().flatten()] = False
    assert torch.all(u[untouched] == 0)
