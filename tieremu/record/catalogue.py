"""What each metric is: its unit, what it means, whether higher is better, and how one run reduces its samples.

A run's samples of a metric (tokens, requests, hops, epochs) become one figure per run (`reduce`); the summary then
describes those per-run figures across repetitions, so a confidence interval is over runs, never over tokens of
one run (which are not independent). A metric not listed here is still recorded and summarised, as a median.
"""

from __future__ import annotations

from dataclasses import dataclass

MEDIAN, TOTAL, MEAN = "median", "total", "mean"
EACH = "each"  # samples are different points of a curve (load levels): each is its own figure, by `seq`


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    meaning: str
    higher_is_better: bool | None  # None: neither (a count, a setting, a fraction that is only context)
    reduce: str = MEDIAN  # how one run's samples become its figure: median, total (counters), mean or each


_METRICS = (
    Metric("tpot_ms", "ms", "time per output token (one sample per token)", False),
    Metric("ttft_ms", "ms", "time to first token (one sample per request)", False),
    Metric("tokens_per_s", "tokens/s", "decode throughput", True),
    Metric("hit_ratio", "fraction", "share of KV block references served by the tier; with no tier facet, served "
           "from any tier (reused, not recomputed)", True),
    Metric("strr", "fraction", "slow-tier resident ratio: share of KV bytes resident outside the fastest tier",
           None),
    Metric("star", "fraction", "slow-tier access ratio: share of KV reads served outside the fastest tier", False),
    Metric("migration_gbps", "GB/s", "migrated bytes over the wall time of the migration (a hop, or the run)", True),
    Metric("window_migration_gbps", "GB/s", "migrated bytes per window of the migrations-over-time series", None),
    Metric("kv_bytes_per_token", "B", "KV bytes read from the tier per generated token", None),
    Metric("kv_staged_bytes_per_token", "B", "host-to-device KV bytes per generated token", None),
    Metric("injected_delay_s", "s", "delay injected by the emulation (its audit rides in the row's params)", None,
           TOTAL),
    Metric("latency_ratio", "x", "emulated tier's achieved latency over the same probe's local latency", None),
    Metric("read_bw_ratio", "x", "emulated tier's achieved read bandwidth over the same probe's local one", None),
    Metric("write_bw_ratio", "x", "emulated tier's achieved write bandwidth over the same probe's local one", None),
    Metric("copy_bw_ratio", "x", "emulated tier's achieved copy bandwidth over the same probe's local one", None),
    Metric("local_latency_ns", "ns", "local DRAM latency measured at run start (the anchor of latency ratios)",
           None),
    Metric("local_read_gb_per_s", "GB/s", "local read bandwidth measured at run start (the anchor of bandwidth "
           "ratios)", None),
    Metric("placement_fraction", "fraction", "share of the tier's pages the kernel reports on the tier's node",
           True),
    Metric("fraction_on_target", "fraction", "share of a hop's pages on the target node afterwards", True),
    Metric("checksum_ok", "bool", "1 when every byte survived the hop", True, MEAN),
    Metric("hop_seconds", "s", "wall time of one round-trip hop", False),
    Metric("hop_injected_s", "s", "delay injected during one hop for emulated ends", None),
    Metric("latency_ns", "ns", "idle latency by dependent-load pointer chase", False),
    Metric("read_gb_per_s", "GB/s", "one-thread read bandwidth", True),
    Metric("write_gb_per_s", "GB/s", "one-thread write bandwidth", True),
    Metric("copy_gb_per_s", "GB/s", "one-thread copy bandwidth", True),
    Metric("loaded_latency_ns", "ns", "chase latency under generated traffic (one sample per load point)", False,
           EACH),
    Metric("promotions", "blocks", "blocks moved to a faster tier", None, TOTAL),
    Metric("demotions", "blocks", "blocks moved to a slower tier", None, TOTAL),
    Metric("ping_pongs", "blocks", "blocks moved back within a short time of their last move", False, TOTAL),
    Metric("evictions", "blocks", "blocks dropped from the last tier", None, TOTAL),
    Metric("moves_failed", "blocks", "moves the kernel refused", False, TOTAL),
    Metric("daemon_cpu_s", "s", "CPU time of the migration daemon", False),
    Metric("prefix_tokens", "tokens", "prompt tokens served from shared prefixes", None),
    # KV compression (tieremu/kv/compress*.py): a decode run over a map with a compressed tier.
    Metric("attention_error_max", "abs", "max |attention output - uncompressed| over the run (mean in params)",
           False),
    Metric("logits_error_max", "abs", "max |next-token logits - uncompressed| over the run (mean in params)", False),
    Metric("token_agreement", "fraction", "share of greedy tokens equal to the uncompressed run's", True),
    Metric("compress_us_per_slice", "us", "time to compress one block's layer slice", False),
    Metric("decompress_us_per_slice", "us", "time to dequantize one block's layer slice for a read", False),
    # Decode over every tier (tieremu/workloads/jobs.py): bytes per tier, the emulated GPU link, file tiers, and the
    # kernel-tiering baseline's own page moves.
    Metric("kv_bytes_read", "B", "KV bytes the decode's attention read from the tier over the run", None, TOTAL),
    Metric("kv_step_bytes_read", "B", "KV bytes read from the tier in one decode step (one sample per step)", None),
    Metric("link_delay_s", "s", "delay injected for KV crossing an emulated GPU tier's host link (PCIe model)", None,
           TOTAL),
    Metric("file_read_gbps", "GB/s", "measured read rate of a file (NVMe) tier's block reads", True),
    Metric("kernel_promoted_pages", "pages", "pages the kernel promoted (vmstat) during a kernel-tiering run", None,
           TOTAL),
    Metric("kernel_demoted_pages", "pages", "pages the kernel demoted (vmstat) during a kernel-tiering run", None,
           TOTAL),
    Metric("kv_bytes_saved_on_read", "B", "KV bytes not read thanks to compression", None),
)
CATALOGUE: dict[str, Metric] = {m.name: m for m in _METRICS}


def describe_metric(name: str, unit: str = "") -> Metric:
    """The catalogue's entry, or a generic one (median per run, no preferred direction) for an unlisted name."""
    return CATALOGUE.get(name) or Metric(name, unit, "", None)
