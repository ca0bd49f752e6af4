"""The soak's five invariants, checked over its records, and the summary it prints.

1. every request ended: success, or a coded OpenAI-shaped error (status + body, or the
   stream's own error event then its end); none hung or was cut; cancelled and
   disconnected clients left no trace (the manager idle, no connection held, fds back);
2. no fault failed more requests than were executing when it hit (instances x slots),
   and no request failed outside a fault's window;
3. service resumed after every fault: the manager live again with the right diagnosis,
   and the next request succeeded;
4. no process of the run outlived the server;
5. the gateway's RSS grew less than RSS_GROWTH_BOUND between warm-up and the end.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

from tests.soak.faults import Fault
from tests.soak.harness import MIB, Report
from tests.soak.traffic import CANCELLED, DISCONNECTED, ERROR, SUCCESS, VIOLATIONS, Record

RSS_GROWTH_BOUND = 64 * MIB
FD_GROWTH_BOUND = 32
INVARIANTS = {
    1: "every request ended with success or a coded error",
    2: "no fault failed more requests than were executing",
    3: "service resumed after every fault",
    4: "no orphan process",
    5: "the gateway's memory stayed bounded",
}


def failures(report: Report) -> list[Record]:
    return [r for r in report.records if r.outcome == ERROR]


def attribute(report: Report) -> tuple[dict[int, list[Record]], list[Record]]:
    """Each failure to the fault whose window holds its end; the rest failed on their own."""
    by_fault: dict[int, list[Record]] = {i: [] for i in range(len(report.faults))}
    alone = []
    for rec in failures(report):
        for i, fault in enumerate(report.faults):
            end = fault.window_end_s
            if fault.start_s <= (rec.end_s or 0.0) and (end is None or rec.end_s is None or rec.end_s <= end):
                by_fault[i].append(rec)
                break
        else:
            alone.append(rec)
    return by_fault, alone


def _where(rec: Record) -> str:
    end = "…" if rec.end_s is None else f"{rec.end_s:.1f}"
    return f"{rec.client} {rec.kind} [{rec.start_s:.1f}–{end}s]"


def violations(report: Report) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {i: [] for i in INVARIANTS}
    records = report.records
    # 1: every request ended, properly; no trace left
    for rec in records:
        if rec.outcome in VIOLATIONS:
            found[1].append(f"{_where(rec)} {rec.outcome} (HTTP {rec.status}): {rec.detail}")
    clients = {r.client for r in records if r.client.startswith("c")}
    if len(clients) < report.settings.clients:
        found[1].append(f"only {len(clients)} of {report.settings.clients} clients sent a request")
    if not any(r.outcome == SUCCESS for r in records):
        found[1].append("no request succeeded")
    found[1] += report.quiesce
    final = report.final
    if final is None or final.outcome != SUCCESS:
        found[1].append(f"the request after the soak did not succeed: {final}")
    if report.fds_early and report.fds_end > report.fds_early + FD_GROWTH_BOUND:
        found[1].append(f"the gateway's open files grew from {report.fds_early} to {report.fds_end}")
    # 2: failures per fault within what was executing; none without a fault
    allowed = report.instances * report.slots
    by_fault, alone = attribute(report)
    for i, fault in enumerate(report.faults):
        failed = by_fault[i]
        if len(failed) > allowed:
            found[2].append(
                f"{fault.kind} at t={fault.at_s:.1f}s failed {len(failed)} requests, more than the "
                f"{allowed} executing (of {fault.in_flight} in flight): "
                + "; ".join(f"{_where(r)} {r.code}" for r in failed[:6])
            )
    for rec in alone:
        found[2].append(
            f"{_where(rec)} failed with no fault behind it: {rec.status} {rec.code}: {rec.detail}"
        )
    # 3: service resumed after each fault
    if report.settings.duration_s >= report.settings.first_fault_s + 10 and not report.faults:
        found[3].append("no fault was injected")
    for fault in report.faults:
        found[3] += [f"{fault.kind} at t={fault.at_s:.1f}s: {p}" for p in fault.problems]
        if fault.served_s is None and not fault.problems:
            found[3].append(f"{fault.kind} at t={fault.at_s:.1f}s: no request succeeded after it")
    # 4: no orphans
    found[4] += [f"outlived the server: {o}" for o in report.orphans]
    # 5: the gateway's memory
    growth = report.rss_end - report.rss_early
    if not report.rss_early or not report.rss_end:
        found[5].append("the gateway's memory was not sampled")
    elif growth >= RSS_GROWTH_BOUND:
        found[5].append(
            f"gateway RSS grew {growth / MIB:.1f} MiB ({report.rss_early / MIB:.1f} → "
            f"{report.rss_end / MIB:.1f}), bound {RSS_GROWTH_BOUND / MIB:.0f} MiB"
        )
    return found


def _fault_line(fault: Fault, failed: list[Record], allowed: int) -> str:
    restarted = fault.new_pid is not None and fault.new_pid != fault.pid
    pids = f"pid {fault.pid}→{fault.new_pid}" if restarted else f"pid {fault.pid}"
    diagnosis = (fault.last_code or "?") if restarted else "-"
    back = "never" if fault.back_s is None else f"{fault.back_s - fault.at_s:.1f}s"
    served = "never" if fault.served_s is None else f"{fault.served_s - fault.at_s:.1f}s"
    codes = ",".join(sorted({r.code or "?" for r in failed})) or "-"
    line = (
        f"  t={fault.at_s:6.1f}s {fault.kind:<13} {pids:<16} {diagnosis:<9} "
        f"in flight {fault.in_flight:>2} (active {fault.active}, queued {fault.queued:>2})  "
        f"failed {len(failed)}/{allowed} [{codes}]  manager back {back}, served {served}"
    )
    return line + (f"  ({fault.note})" if fault.note else "")


def summary(report: Report) -> str:
    s = report.settings
    records = report.records
    traffic = [r for r in records if r.client.startswith("c")]
    outcomes = collections.Counter(r.outcome for r in records)
    kinds = collections.Counter(r.kind for r in traffic)
    errors = collections.Counter(
        f"{r.code} {r.status if r.status != 200 else 'in-stream'}" for r in failures(report)
    )
    content_first = sum(r.content_before_error for r in failures(report))
    by_fault, alone = attribute(report)
    allowed = report.instances * report.slots
    found = violations(report)
    growth = report.rss_end - report.rss_early
    lines = [
        f"soak: {report.elapsed_s:.0f} s of traffic (ALLM_SOAK_S={s.duration_s:g}), {s.clients} clients, "
        f"{MODEL_NOTE}, {report.instances} text instance(s) × {report.slots} slot(s), "
        f"heartbeat timeout {s.heartbeat_timeout_s:g} s, memory cap {s.memory_cap_mib} MiB",
        f"requests: {len(records)} ({len(traffic)} from clients; "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        + f"; {len(records) - len(traffic)} probes and triggers)",
        f"  succeeded {outcomes[SUCCESS]}, failed {outcomes[ERROR]}, cancelled {outcomes[CANCELLED]}, "
        f"disconnected {outcomes[DISCONNECTED]}, "
        + ", ".join(f"{v} {outcomes[v]}" for v in ("hung", "cut", "malformed")),
        "  errors by code: " + (", ".join(f"{k} ×{n}" for k, n in errors.most_common()) or "none"),
        f"  content before the error: {content_first} of {outcomes[ERROR]} failures; "
        f"failures outside any fault: {len(alone)}",
        f"faults: {len(report.faults)} (allowed failures each: {allowed})",
        *(_fault_line(f, by_fault[i], allowed) for i, f in enumerate(report.faults)),
        f"gateway RSS: {report.rss_early / MIB:.1f} MiB after warm-up → "
        f"{report.rss_end / MIB:.1f} MiB at the end ({growth / MIB:+.1f} MiB; "
        f"max {report.rss_max / MIB:.1f}); "
        f"open files {report.fds_early} → {report.fds_end}",
        f"manager processes: {len(report.manager_processes)}; orphans: {len(report.orphans)}",
    ]
    for i, name in INVARIANTS.items():
        state = "ok" if not found[i] else f"FAILED ({len(found[i])})"
        lines.append(f"invariant {i} {name}: {state}")
        lines += [f"    {v}" for v in found[i][:12]]
        if len(found[i]) > 12:
            lines.append(f"    … and {len(found[i]) - 12} more")
    return "\n".join(lines)


MODEL_NOTE = "SmolLM2-135M-Instruct Q4_1 on llama.cpp"


def write_records(report: Report, path: Path) -> None:
    """Every request and fault of the run as JSON, for a closer look at a long run."""
    data = {
        "settings": dataclasses.asdict(report.settings),
        "requests": [dataclasses.asdict(r) for r in report.records],
        "faults": [{k: v for k, v in dataclasses.asdict(f).items() if k != "trigger"} for f in report.faults],
    }
    path.write_text(json.dumps(data, indent=1))
