from __future__ import annotations

import pandas as pd

from recsys_lm.data.split import leave_one_out


def test_leave_one_out_holds_out_the_last_two_by_time():
    frame = pd.DataFrame(
        {
            "user": [0, 0, 0, 0, 1, 1],
            "item": [5, 6, 7, 8, 1, 2],
            "timestamp": [40, 10, 30, 20, 1, 2],  # user 0 out of order on purpose
        }
    )
    split = leave_one_out(frame, num_users=2)
    assert split.train[0] == [6, 8] and split.val[0] == 7 and split.test[0] == 5
    assert split.train[1] == [1, 2] and split.val[1] == -1  # too short: training only
    assert split.eval_users("test") == [0]
    assert split.history(0, "test") == [6, 8, 7]  # the test sees the validation item
    assert split.history(0, "val") == [6, 8]
    assert split.counts(10).tolist() == [0, 1, 1, 0, 0, 0, 1, 0, 1, 0]
