"""The record model every result is made of (layer 0: imports nothing of tieremu's but errors).

- `origin`: where a figure comes from (measured / emulated / vm / simulated);
- `catalogue`: what a metric is (unit, meaning, whether higher is better, how a run reduces its samples);
- `row`: one figure of one run with its typed facets (tier, phase, labels);
- `stats`: the one statistics function (median, mean, confidence interval, min, max, n) and the machine's load;
- `runs`: one record per run (status, seconds, error, load before and after, noisy and why);
- `summary`: the long-format summary (one row per run group x metric x tier x phase).
"""

SCHEMA_VERSION = 2  # of a sweep result folder: runs.jsonl, metrics.jsonl (`seq`), long summary.csv
