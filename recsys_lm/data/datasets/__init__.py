"""Task datasets: index tuples in, batch dataclasses (`recsys_lm.data.batches`) out.

Each `Task` (recsys_lm.data.tasks) names the builders that turn a `PreparedData` into its
train / val / test datasets; the datasets here only read the split and the token cache.
"""
