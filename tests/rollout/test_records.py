"""Record summaries shared by the parity CLI, the benchmark and the demo."""

from rollout.engine import RolloutRecord, mean_loops_per_token


def record(exit_steps: list[int]) -> RolloutRecord:
    n = len(exit_steps)
    return RolloutRecord([1], [5] * n, [0.0] * n, exit_steps, 0, "stop", num_loops=4)


def test_mean_loops_counts_only_positions_that_ran():
    # Each completion's last token is never fed back (it records num_loops by convention): not counted.
    assert mean_loops_per_token([record([1, 2, 4]), record([3, 4])]) == 2.0
    assert mean_loops_per_token([record([4])]) == 0.0
