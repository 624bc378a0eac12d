"""Printing a precompute plan (``kdcache precompute … --dry-run``)."""

from __future__ import annotations

import typer

from kdcache_cli.app import format_size, print_table


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def print_plan(cfg) -> None:
    """Estimate the run ``cfg`` (a PrecomputeConfig or its resolved settings) describes
    (kdcache/teacher/plan.py) and print it; writes nothing."""
    from kdcache.teacher.plan import plan

    p = plan(cfg)
    typer.echo(f"dry run: cache {p.cache_id} at {p.path} — nothing written")
    if p.reuses:
        typer.echo("a complete cache with this id exists: precompute would reuse it and run no teacher forward")
    typer.echo(f"teacher forward passes: {p.forward_passes:,} ({p.samples:,} samples x {p.views} views x "
               f"{p.members} member{'s' if p.members > 1 else ''})")
    rows = [("array", "shape", "dtype", "raw", "estimated")]
    rows += [(name, "x".join(map(str, a["shape"])), a["dtype"], format_size(a["raw_bytes"]), format_size(a["estimated_bytes"]))
             for name, a in p.arrays.items()]
    rows.append(("total", "", "", format_size(sum(a["raw_bytes"] for a in p.arrays.values())), format_size(p.total_bytes)))
    print_table(rows)
    typer.echo(f"estimated time: {_duration(p.seconds)} at {p.views_per_second:,.0f} views/s "
               f"(timed on a warm-up of {p.warmup_views} views; bytes from encoding them with the real codecs)")
