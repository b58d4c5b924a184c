"""The soak run's report: the kill window, requests per kind and outcome, latency percentiles, the checks, the
resource trend, and the plot. Pure functions of the run's records, events and samples (seconds on one clock)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .common import percentile

GENERATING = ("plain", "completions", "stream", "steered", "adapter-lora", "adapter-iapt")


def recovery(records: list[dict], events: list[dict], killed: float | None) -> float | None:
    """The end of the kill window: when the first successful generation that started after the restart (the
    first server start after the kill; without one, after the kill itself) finished. None while there is none."""
    if killed is None:
        return None
    starts = [e["t"] for e in events if e["event"] == "start" and e["t"] >= killed]
    after = starts[0] if starts else killed
    ends = [r["t_end"] for r in records
            if r["kind"] in GENERATING and r["outcome"] == "ok" and r["t_start"] >= after]
    return min(ends) if ends else None


KINDS = ("plain", "completions", "stream", "steered", "adapter-lora", "adapter-iapt", "disconnect", "bad")


def covered(records: list[dict], methods: list[str]) -> bool:
    """Whether every kind, and every steering method, has been served as expected at least once."""
    ok = [r for r in records if r["outcome"] == "ok"]
    return {r["kind"] for r in ok} >= set(KINDS) and {r["detail"] for r in ok if r["kind"] == "steered"} >= set(methods)


def _latency(recs: list[dict]) -> dict:
    e2e = [r["t_end"] - r["t_start"] for r in recs]
    ttft = [r["ttft"] for r in recs if r.get("ttft") is not None]
    out = {f"e2e_p{q}_s": _r(percentile(e2e, q)) for q in (50, 99)}
    if ttft:
        out.update({f"ttft_p{q}_s": _r(percentile(ttft, q)) for q in (50, 99)})
    return out


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def per_kind(records: list[dict]) -> dict:
    """For each kind: requests, outcomes, statuses, requests in the kill window, and the latency of the ones
    served as expected outside it; per method (steered) and per case (bad) as well."""
    out = {}
    for kind in sorted({r["kind"] for r in records}):
        recs = [r for r in records if r["kind"] == kind]
        good = [r for r in recs if r["outcome"] == "ok" and not r["in_window"]]
        row = {"requests": len(recs), "in_kill_window": sum(r["in_window"] for r in recs),
               "outside_window_as_expected": len(good),
               "outcomes": dict(Counter(r["outcome"] for r in recs)),
               "statuses": dict(Counter(str(r["status"]) for r in recs)), **_latency(good)}
        if kind in ("steered", "bad", "adapter-lora", "adapter-iapt", "disconnect"):
            row["by_detail"] = {d: {"requests": sum(r["detail"] == d for r in recs),
                                    "outcomes": dict(Counter(r["outcome"] for r in recs if r["detail"] == d)),
                                    "statuses": dict(Counter(str(r["status"]) for r in recs if r["detail"] == d))}
                                for d in sorted({str(r["detail"]) for r in recs})}
        out[kind] = row
    return out


def _slope(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts (per second); None for fewer than two points."""
    if len(ts) < 2 or max(ts) == min(ts):
        return None
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / sum((t - mt) ** 2 for t in ts)


def resources(samples: list[dict], events: list[dict], settle_s: float = 5.0) -> dict:
    """Per server start: RSS and anonymous RSS (MiB) and open fds of the server and its engine from `settle_s` after it was ready
    to its end: first, last, max, and the least-squares trend per minute (a leak shows as a steady rise)."""
    out = {}
    for inc in sorted({s["incarnation"] for s in samples}):
        ready = next((e["t"] for e in events if e["event"] == "ready" and e["incarnation"] == inc), None)
        rows = [s for s in samples if s["incarnation"] == inc and ready is not None and s["t"] >= ready + settle_s]
        if not rows:
            continue
        entry = {"samples": len(rows), "from_s": rows[0]["t"], "to_s": rows[-1]["t"]}
        for key in ("server_rss_mib", "server_anon_mib", "server_fds", "engine_rss_mib", "engine_anon_mib",
                    "engine_fds"):
            pts = [(s["t"], s[key]) for s in rows if s[key] is not None]
            if pts:
                slope = _slope([t for t, _ in pts], [v for _, v in pts])
                entry[key] = {"first": _r(pts[0][1], 1), "last": _r(pts[-1][1], 1), "max": _r(max(v for _, v in pts), 1),
                              "trend_per_min": None if slope is None else _r(60 * slope, 2)}
        out[str(inc)] = entry
    return out


def check(ok: bool, detail) -> dict:
    return {"ok": bool(ok), "detail": detail}


def _samples(recs: list[dict], n: int = 5) -> list[dict]:
    keep = ("kind", "detail", "tenant", "t_start", "t_end", "status", "outcome", "error")
    return [{k: r.get(k) for k in keep} for r in recs[:n]]


def checks(run: dict, ctx, events: list[dict], window: tuple[float, float] | None, killing: bool) -> dict:
    records = run["records"]
    outside = [r for r in records if not r["in_window"]]
    compared = [r for r in records if r["kind"] in ("plain", "completions", "stream") and r["outcome"] in
                ("ok", "mismatch")]
    mismatches = [dict(r, expected=ctx.baseline.get(("completions" if r["kind"] == "completions" else "chat",
                                                     r["detail"]))) for r in compared if r["outcome"] == "mismatch"]
    five = [r for r in outside if r["outcome"] == "5xx"]
    failed = [r for r in outside if r["outcome"] not in ("ok", "mismatch", "5xx")]
    served = Counter(r["kind"] for r in outside if r["outcome"] == "ok")
    restarts = [e for e in events if e["event"] == "restart"]
    final_diff = {f"{k[0]}: {k[1]}": {"unloaded_first": ctx.baseline.get(k), "unloaded_after": v}
                  for k, v in run["final_greedy"].items() if ctx.baseline.get(k) != v}
    out = {
        "no_5xx_outside_kill_window": check(not five, {"count": len(five), "samples": _samples(five)}),
        "greedy_equal_to_unloaded_run": check(compared and not mismatches, {
            "compared": len(compared), "mismatches": len(mismatches),
            "samples": [{k: m.get(k) for k in ("kind", "detail", "t_start", "in_window", "text", "expected")}
                        for m in mismatches[:5]]}),
        "no_other_failure_outside_kill_window": check(not failed, {
            "count": len(failed), "by_outcome": dict(Counter(f"{r['kind']}: {r['outcome']}" for r in failed)),
            "samples": _samples(failed)}),
        "every_kind_served": check(all(served[k] for k in KINDS), dict(served)),
        "every_steering_method_served": check(
            set(ctx.methods) <= {r["detail"] for r in outside if r["kind"] == "steered" and r["outcome"] == "ok"},
            {"methods": ctx.methods, "refused_by_the_model": ctx.refused_methods}),
        "engine_requests_drained": check(run["engine_unfinished_after_drain"] == 0,
                                         {"steerserve_engine_unfinished_requests": run["engine_unfinished_after_drain"]}),
        "greedy_unchanged_after_the_soak": check(not final_diff, final_diff),
    }
    if killing:
        out["engine_killed_and_recovered"] = check(
            window is not None and window[1] is not None and restarts,
            {"kill_window_s": None if not window or window[1] is None else round(window[1] - window[0], 2),
             "restarts": restarts})
    return out


def build(run: dict, ctx, events: list[dict], conditions: dict, a) -> dict:
    killed = run["killed"]
    recovered = recovery(run["records"], events, killed)
    window = (killed, recovered) if killed is not None else None
    for r in run["records"]:
        r["in_window"] = window is not None and r["t_end"] >= killed and (recovered is None or
                                                                        r["t_start"] <= recovered)
    ok_out = [r for r in run["records"] if r["outcome"] == "ok" and not r["in_window"]]
    traffic_s = run["t_end"] - run["t_traffic"]
    return {
        "conditions": conditions,
        "setup": {"from_s": round(run["t_setup"], 2), "to_s": round(run["t_traffic"], 2)},
        "traffic": {"from_s": round(run["t_traffic"], 2), "to_s": round(run["t_end"], 2),
                    "duration_s": round(traffic_s, 1), "requests": len(run["records"]),
                    "requests_per_s": round(len(run["records"]) / max(traffic_s, 1e-9), 2),
                    "served_as_expected_outside_window": len(ok_out)},
        "kill_window": None if window is None else {
            "killed_s": killed, "recovered_s": recovered,
            "length_s": None if recovered is None else round(recovered - killed, 2),
            "requests_overlapping": sum(r["in_window"] for r in run["records"]),
            "outcomes_in_window": dict(Counter(f"{r['kind']}: {r['outcome']}" for r in run["records"]
                                               if r["in_window"]))},
        "kinds": per_kind(run["records"]),
        "steering_methods": {"served": ctx.methods, "refused_by_the_model": ctx.refused_methods},
        "checks": checks(run, ctx, events, window, a.kill_at is not None),
        "resources": resources(run["samples"], events),
        "events": events,
        "samples": run["samples"],
        "records": [{k: v for k, v in r.items() if k != "text"} for r in run["records"]],
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, fds, lat) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    samples = out["samples"]
    for inc in sorted({s["incarnation"] for s in samples}):
        rows = [s for s in samples if s["incarnation"] == inc]
        ts = [s["t"] for s in rows]
        for ax, key, style, what in ((rss, "server_rss_mib", "-", "RSS"), (rss, "engine_rss_mib", "--", "RSS"),
                                     (rss, "server_anon_mib", ":", "anonymous"),
                                     (rss, "engine_anon_mib", "-.", "anonymous"),
                                     (fds, "server_fds", "-", "fds"), (fds, "engine_fds", "--", "fds")):
            ax.plot(ts, [s.get(key) for s in rows], style, color=f"C{inc - 1}",
                    label=f"{key.split('_')[0]} {what}, start {inc}")
    kinds = sorted({r["kind"] for r in out["records"]})
    for i, kind in enumerate(kinds):
        recs = [r for r in out["records"] if r["kind"] == kind and r["outcome"] == "ok"]
        lat.scatter([r["t_start"] for r in recs], [r["t_end"] - r["t_start"] for r in recs], s=6,
                    color=f"C{i}", label=kind)
    bad = [r for r in out["records"] if r["outcome"] != "ok"]
    lat.scatter([r["t_start"] for r in bad], [r["t_end"] - r["t_start"] for r in bad], s=18, marker="x",
                color="black", label="not as expected")
    win = out["kill_window"]
    for ax in (rss, fds, lat):
        if win:
            ax.axvspan(win["killed_s"], win["recovered_s"] or out["traffic"]["to_s"], color="red", alpha=0.12,
                       label="kill window" if ax is rss else None)
        ax.axvspan(0, out["traffic"]["from_s"], color="grey", alpha=0.1)
        ax.grid(alpha=0.3)
    rss.set(ylabel="MiB", title="resident memory, and its anonymous part (grey: start-up and set-up; red: kill window)")
    fds.set(ylabel="open file descriptors", title="open file descriptors")
    lat.set(ylabel="seconds", xlabel="seconds since the first server start", yscale="log",
            title="end-to-end latency per request, by start time")
    rss.legend(fontsize=7, ncol=2)
    fds.legend(fontsize=7, ncol=2)
    lat.legend(fontsize=7, ncol=3, markerscale=2)
    fig.suptitle(f"steerserve soak: {out['traffic']['requests']} requests in {out['traffic']['duration_s']:.0f} s, "
                 f"3 tenants ({out['conditions']['cpu_cores']} CPU cores, shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_summary(out: dict) -> None:
    t = out["traffic"]
    print(f"\n{t['requests']} requests in {t['duration_s']:.0f} s ({t['requests_per_s']:.2f}/s)")
    if out["kill_window"]:
        w = out["kill_window"]
        print(f"kill window: {w['length_s']} s (SIGKILL at {w['killed_s']:.1f} s), {w['requests_overlapping']} "
              f"requests overlapping it")
    print(f"\n{'kind':<14}{'requests':>9}{'in window':>10}{'ok outside':>11}{'e2e p50 s':>11}{'e2e p99 s':>11}"
          "  outcomes (all)")
    for kind, row in out["kinds"].items():
        p50, p99 = row.get("e2e_p50_s"), row.get("e2e_p99_s")
        print(f"{kind:<14}{row['requests']:>9}{row['in_kill_window']:>10}{row['outside_window_as_expected']:>11}"
              f"{'-' if p50 is None else f'{p50:.2f}':>11}{'-' if p99 is None else f'{p99:.2f}':>11}  "
              f"{row['outcomes']}")
    for key, r in out["resources"].items():
        print(f"server start {key}: " + ", ".join(f"{k} {v['first']} -> {v['last']} (max {v['max']}, "
                                                 f"{v['trend_per_min']}/min)"
                                                 for k, v in r.items() if isinstance(v, dict)))
    print()
    for name, c in out["checks"].items():
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {name}" + ("" if c["ok"] else f": {c['detail']}"))
