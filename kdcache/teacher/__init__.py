"""Stage 1: run the teacher once over recorded views and write what students need into a cache.

``outputs`` (what is stored per view), ``ensemble`` (one model or several, and their hashes),
``passes`` (the one teacher pass every writer uses), ``precompute``, ``extra_views`` (HE-DA),
``extend`` and ``plan``. Nothing here imports ``kdcache.student``.
"""
