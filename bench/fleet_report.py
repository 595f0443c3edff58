"""Turns bench/fleet.sh's results.jsonl into a Markdown table (stdout, for
BENCHMARKS.md), a plot of each cost against N (PNG), and a last summary line."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
png = sys.argv[2]
by = {}
for r in rows:
    by.setdefault(r["devices"], {})[(r["scenario"], r.get("heartbeat_seconds"))] = r


def get(n, key, *path):
    r = by.get(n, {}).get(key)
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


print("| N | connect s | rollout s | cloud→edge p50 / p99 ms | heartbeat p50 / p99 ms (10 s) | storm recovery s | outage recovery s (operator fds 10 s after) | churn join p50 / p99 ms | writes/s at 10 s / 5 s heartbeats (60 s lease) | operator CPU cores (steady) | operator peak RSS MiB | operator fds (steady run, peak) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
ns = sorted(by)
for n in ns:
    ro, st, s10, s30 = ("rollout", 10), ("storm", 10), ("steady", 10), ("steady", 5)
    ou, ch = ("outage", 10), ("churn", 10)
    print(
        f"| {n:,} | {fmt(get(n, ro, 'connect_seconds'))} | {fmt(get(n, ro, 'rollout_seconds'))} "
        f"| {fmt(get(n, ro, 'cloud_to_edge_ms', 'p50'), 0)} / {fmt(get(n, ro, 'cloud_to_edge_ms', 'p99'), 0)} "
        f"| {fmt(get(n, s10, 'heartbeat_rtt_ms', 'p50'))} / {fmt(get(n, s10, 'heartbeat_rtt_ms', 'p99'))} "
        f"| {fmt(get(n, st, 'storm_recovery_seconds'))} "
        f"| {fmt(get(n, ou, 'storm_recovery_seconds'))} ({fmt(get(n, ou, 'operator', 'fds_settled'), 0)}) "
        f"| {fmt(get(n, ch, 'churn_join_ms', 'p50'), 0)} / {fmt(get(n, ch, 'churn_join_ms', 'p99'), 0)} "
        f"| {fmt(get(n, s10, 'scenario_api_writes_per_second'))} / {fmt(get(n, s30, 'scenario_api_writes_per_second'))} "
        f"| {fmt(get(n, s10, 'scenario_operator_cpu_cores'), 2)} "
        f"| {fmt(max(filter(None, [get(n, k, 'operator', 'peak_rss_mib') for k in (ro, st, ou, ch, s10, s30)]), default=None), 0)} "
        f"| {fmt(get(n, s10, 'operator', 'peak_fds'), 0)} |"
    )

series = [
    ("rollout s", lambda n: get(n, ("rollout", 10), "rollout_seconds")),
    ("cloud→edge p99 s", lambda n: (get(n, ("rollout", 10), "cloud_to_edge_ms", "p99") or 0) / 1000 or None),
    ("heartbeat p99 s", lambda n: (get(n, ("steady", 10), "heartbeat_rtt_ms", "p99") or 0) / 1000 or None),
    ("storm recovery s", lambda n: get(n, ("storm", 10), "storm_recovery_seconds")),
    ("operator peak RSS GiB", lambda n: (get(n, ("steady", 10), "operator", "peak_rss_mib") or 0) / 1024 or None),
    ("API writes/s ÷ 100", lambda n: (get(n, ("steady", 10), "scenario_api_writes_per_second") or 0) / 100 or None),
]
fig, ax = plt.subplots(figsize=(8, 5))
for label, f in series:
    pts = [(n, f(n)) for n in ns if f(n) is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("simulated devices (N)")
ax.set_ylabel("value (see legend for unit)")
ax.set_title("edgefleet fleet SLIs vs N (one operator replica, 2 cores)")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(png, dpi=110)
last = ns[-1] if ns else 0
print(
    f"n_max={last} rollout_s={fmt(get(last, ('rollout', 10), 'rollout_seconds'))} "
    f"heartbeat_p99_ms={fmt(get(last, ('steady', 10), 'heartbeat_rtt_ms', 'p99'))} "
    f"writes_per_s_10s={fmt(get(last, ('steady', 10), 'scenario_api_writes_per_second'))} "
    f"writes_per_s_5s={fmt(get(last, ('steady', 5), 'scenario_api_writes_per_second'))}"
)
