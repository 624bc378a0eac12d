"""Commands that look at caches, and the one that brings an old one up to date: info, verify, ls, upgrade."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from kdcache_cli.app import app, format_size, print_table


@app.command()
def info(
    cache: Annotated[str, typer.Argument(help="Cache path, alias path or URL (as `kdcache precompute` printed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Skip teacher top-1 and energy quantiles (they read every view).")] = False,
) -> None:
    """Show a cache: manifest, per-array sizes and compression, teacher top-1, energy quantiles.

    Sizes: stored and raw bytes per array, their ratio, stored bytes per view.
    Teacher top-1: argmax of the cached targets against the labels, over every cached view.
    Energy quantiles: the 0/20/50/80/100% points at each stored temperature (of an even sample of 2**20 views beyond that many; extremes exact).
    """
    from kdcache.cache.info import describe, modes

    d = describe(cache, scan=not quick)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    m = d["manifest"]
    members = ", ".join(f"{t['spec']}{' ' + t['tag'] if t.get('tag') else ''} ({t['sha256'][:19]}…)"
                        for t in m["teacher"]["members"])
    lay, ds, rec = m["layout"], m["dataset"], m["recipe"]
    stored = d["stored_format"]
    fmt = (f"format {stored} (read as {m['format_version']}; `kdcache upgrade` rewrites it)"
           if stored != m["format_version"] else f"format {stored}")
    typer.echo(f"cache {d['cache_id']} at {d['path']}  {fmt}  status {m['status']} "
               f"({d['shards_done']}/{d['num_shards']} shards)")
    typer.echo(f"teacher   {members}")
    if m["teacher"].get("class_map"):
        cmap = m["teacher"]["class_map"]
        typer.echo(f"class map {len(cmap['indices'])} of the teacher's {cmap['teacher_classes']} classes")
    typer.echo(f"dataset   {ds['spec']} train split: {ds['num_samples']} samples, {ds['num_classes']} classes, "
               f"{ds['fingerprint'][:23]}…")
    typer.echo(f"recipe    {rec['augment']['spec']}  views {rec['views']}  seed {rec['seed']}  "
               f"input {rec['input_size']}px {rec['interpolation']}, mean {rec['mean']} std {rec['std']}")
    typer.echo(f"outputs   {modes(m)}  energy T={m['outputs']['energy']['temperatures']}")
    if m.get("imported"):
        imp = m["imported"]
        typer.echo(f"imported  from {imp['format']} (layout version {imp.get('version')}) at {imp.get('source')}")
    if "extra_views" in d:
        he, spec = d["extra_views"], rec["he_extra"]
        typer.echo(f"he-extra  {he['samples']} samples (top {spec['fraction']:g} by mean energy at "
                   f"T={spec['energy_temperature']:g}, >= {he['threshold_energy']:.3f}) x {he['views']} "
                   f"{spec['augment']['spec']} views, {format_size(he['stored_bytes'])}")
    typer.echo(f"layout    chunks of {lay['chunk_samples']} samples x 1 view, shards of {lay['shard_samples']} "
               f"samples, Zarr sharding {'on' if lay.get('sharded') else 'off'}")
    bound = d["bound"]
    typer.echo("bound     " + ("chunks to their place (a digest per chunk)" if bound["chunks"] else
                               "chunks NOT bound to their place (made before format 5: a moved chunk is not caught)")
               + "; " + ("inputs: the crc32c of every image the teacher read" if bound["inputs"] else
                         "inputs NOT bound (a changed source image is not caught)"))
    p = m["provenance"]
    typer.echo(f"made by   kdcache {p['kdcache']}, torch {p['torch']}, zarr {p['zarr']}, "
               f"{p.get('user', '?')}@{p['host']} at {p['created']}")
    rows = [("array", "shape", "dtype", "stored", "raw", "ratio", "bytes/view")]
    for name, a in d["arrays"].items():
        ratio = f"{a['ratio']:.2f}" if a["ratio"] else "-"
        rows.append((name, "x".join(map(str, a["shape"])), a["dtype"], format_size(a["stored_bytes"]), format_size(a["raw_bytes"]),
                     ratio, f"{a['bytes_per_view']:.1f}"))
    rows.append(("total (per view, without labels)", "", "", "", "", "", f"{d['bytes_per_view']:.1f}"))
    typer.echo("")
    print_table(rows)
    if quick:
        return
    typer.echo("")
    if d["teacher_top1"] is not None:
        typer.echo(f"teacher top-1 on the cached views: {d['teacher_top1']:.2f}% of {d['views_scanned']} views")
    for t, q in d["energy_quantiles"].items():
        typer.echo(f"energy T={t} quantiles 0/20/50/80/100%: " + " ".join(f"{v:.3f}" for v in q))


@app.command()
def verify(
    cache: Annotated[str, typer.Argument(help="Cache path, alias path or URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    recompute: Annotated[int, typer.Option(help="Also replay this many random (sample, view) pairs, rerun the teacher and compare with the cached outputs (0: no replay).")] = 0,
    weights: Annotated[list[Path] | None, typer.Option(help="--recompute: teacher weights file, checked against the manifest's sha256; repeat per ensemble member, in order (default: the paths the manifest records).")] = None,
    recompute_seed: Annotated[int, typer.Option(help="--recompute: seed choosing the pairs.")] = 0,
    dataset: Annotated[str | None, typer.Option(help="--recompute: dataset spec if it moved (default: the manifest's; fingerprint must match).")] = None,
    device: Annotated[str, typer.Option(help="--recompute: auto (CUDA if available), cpu or cuda[:N].")] = "auto",
    allow_version_drift: Annotated[bool, typer.Option("--allow-version-drift", help="--recompute: replay a timm: recipe under other package versions than the cache recorded, to check whether its views still give the stored outputs.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Mark every shard holding a missing, unreadable or non-finite chunk as unwritten, so that rerunning the precompute command rewrites exactly those shards.")] = False,
    params: Annotated[bool, typer.Option("--params", help="Also check that every stored augmentation param lies in its op's domain (a shared cache is untrusted; loads the ops, so it imports torch). --recompute does it too.")] = False,
) -> None:
    """Check a cache's integrity by reading every chunk; exit 1 naming each bad array and chunk.

    Checks crc32c checksums, missing chunk files, shapes and dtypes, NaN/Inf, labels, shard status;
    with --params (or --recompute) also that every stored augmentation param is one its op writes.
    With --recompute N --weights W it also replays N seeded views and reruns the teacher: params must
    resample bit for bit and outputs match within the tolerance of docs/format.md.
    Exit code 0: intact; 1: problems found; 2: the cache could not be opened.
    """
    from kdcache.cache.integrity import repair as mend
    from kdcache.cache.integrity import verify as run

    report, reopened = mend(cache) if repair else (run(cache, params=params or recompute > 0), [])
    replayed = None
    if recompute and report.ok:
        from kdcache.audit import recompute as replay  # the teacher's side, torch: only to recompute

        replayed = replay(cache, recompute, [str(w) for w in weights or ()] or None, recompute_seed, dataset,
                          device=device, allow_version_drift=allow_version_drift)
    problems = [*report.problems, *(replayed.problems if replayed else ())]
    if as_json:
        typer.echo(json.dumps(report.to_json() | ({"recompute": replayed.to_json()} if replayed else {})
                              | {"ok": not problems}, indent=2))
    else:
        for problem in problems:
            typer.echo(f"BAD  {problem}")
        verdict = "intact" if not problems else f"{len(problems)} problem(s)"
        replay_note = f", {replayed.pairs} views replayed" if replayed else ""
        typer.echo(f"cache {report.cache_id} at {report.path}: {verdict} — {report.arrays} arrays, "
                   f"{report.chunks_read} chunks read, {report.shards_done}/{report.num_shards} shards written"
                   f"{replay_note}")
        if reopened:
            typer.echo(f"repair: shards {', '.join(map(str, reopened))} marked unwritten — rerun the precompute "
                       "command (the same options) to rewrite them")
    if problems:
        raise typer.Exit(code=1)


@app.command("ls")
def list_caches(
    root: Annotated[str, typer.Argument(help="Root folder or URL given to `precompute --out`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the caches under ROOT: id, alias, teacher, dataset, views, outputs, size, status, creator."""
    from kdcache.cache.info import list_caches as scan

    rows = scan(root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no caches under {root}")
        return
    table = [("id", "alias", "teacher", "dataset", "views", "outputs", "size", "status", "created")]
    for r in rows:
        if "teacher" not in r:
            table.append((r["id"], "", "", "", "", "", "", r["status"], ""))
            continue
        alias = ",".join(a.rstrip("/").rpartition("/")[2] for a in r["alias"]) or "-"
        table.append((r["id"], alias, r["teacher"], r["dataset"], str(r["views"]), r["modes"], format_size(r["size_bytes"]),
                      r["status"], f"{r['created_by']} {r['created']}"))
    print_table(table)


@app.command()
def upgrade(
    cache: Annotated[str, typer.Argument(help="Cache path, alias path or URL made by an earlier kdcache.")],
    wait: Annotated[bool, typer.Option("--wait", help="If another writer holds this cache, wait for it instead of stopping.")] = False,
    break_lock: Annotated[bool, typer.Option("--break-lock", help="Remove the writer lock of a writer that is gone (no heartbeat for 60 s); a live writer's lock is never removed.")] = False,
) -> None:
    """Rewrite an older cache's manifest in today's format, in place (docs/format.md §Versions).

    Only the manifest changes, in one write under the writer lock: no array byte is rewritten. Every
    older cache is readable without it; upgrading lets reads refuse missing chunks (when a listing
    finds them all present) and gives the cache the id today's precompute computes for it, with an
    alias ROOT/<new id>, so a precompute of the same settings reuses it. Running it again is harmless.
    """
    from kdcache.cache.upgrade import upgrade as run

    r = run(cache, wait=wait, break_lock=break_lock)
    if not r.changed:
        typer.echo(f"cache {r.cache_id} at {r.path} is already format {r.format_version}")
    else:
        typer.echo(f"cache {r.previous_id} at {r.path}: format {r.previous_format} -> {r.format_version}, "
                   f"id {r.cache_id}; only the manifest was rewritten")
    if r.every_chunk:
        typer.echo("every chunk object is present: reads now refuse a missing one")
    else:
        typer.echo(f"{r.missing_chunks} chunk objects are absent (an earlier writer skipped chunks equal to the fill "
                   "value; they read as zeros), so reads cannot tell a lost chunk from them — "
                   "`kdcache verify --recompute N` checks values against the teacher")
    typer.echo(f"aliases {', '.join(r.aliases)}")
