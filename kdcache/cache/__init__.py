"""The cache: Zarr v3 layout and arrays, manifest, roots and aliases, writer locks, integrity, info.

This package imports neither stage (``kdcache.teacher``, ``kdcache.student``) and is the only code that
touches Zarr. docs/format.md is the specification of what it reads and writes.
"""
