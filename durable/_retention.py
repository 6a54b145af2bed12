"""``durable retention run|status``: a retention pass now, or each segment of the partitioned
tables, its size, when it falls due and what it would carry forward."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta

from durable._app import App


async def retention(app: App, args: argparse.Namespace) -> int:
    """``durable retention run|status``: a pass now, or the segments and what keeps them."""
    if args.retention_command == "run":
        done = await app.clean_up()
        if done is None:
            print("another process is cleaning up now; nothing done")
            return 0
        print(f"opened {done.opened} segment(s); dropped {len(done.dropped)}")
        for report in done.dropped:
            print(
                f"  segment {report['segment']}: {report['runs_removed']:,} runs removed, "
                f"{report['bytes']:,} bytes of partitions dropped; carried "
                f"{report['runs_kept']:,} runs and {report['events_kept']:,} events forward "
                f"into segment {report['into']}"
            )
        return 0
    print(f"{'segment':>7} {'retention':<12} {'state':<26} {'size':>10} {'runs':>9} {'events':>8}")
    for segment in await app.retention_status():
        kept = "for ever" if segment.retention is None else _span(segment.retention)
        if segment.dropped_at is not None:
            removed = segment.removed or {}
            print(
                f"{segment.id:>7} {kept!s:<12} {'dropped ' + _when(segment.dropped_at):<26} "
                f"{removed.get('bytes', 0):>10,} {removed.get('runs_removed', 0):>9,} "
                f"(removed; {removed.get('runs_kept', 0):,} runs carried forward)"
            )
            continue
        state = "open" if segment.closed_at is None else "due " + _when(segment.due_at)
        print(
            f"{segment.id:>7} {kept!s:<12} {state:<26} {segment.bytes or 0:>10,} "
            f"{segment.runs or 0:>9,} {segment.events or 0:>8,}"
        )
        pins = [f"{n:,} {_KEPT[why]}" for why, n in (segment.kept or {}).items()]
        if segment.events_kept:
            pins.append(f"{segment.events_kept:,} events a run may still receive")
        if pins:
            print("          would carry forward: " + ", ".join(pins))
    return 0


_KEPT = {
    "unfinished": "unfinished runs",
    "recent": "runs finished within the retention",
    "family": "runs of an unfinished parent or child",
    "forked": "runs a fork refers to",
}


def _span(span: timedelta) -> str:
    """A retention as people write it: 7 days, 12 hours, 90 minutes."""
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        count, rest = divmod(int(span.total_seconds()), size)
        if count and not rest:
            return f"{count} {unit}" + ("s" if count > 1 else "")
    return str(span)


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")
