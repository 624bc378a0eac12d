"""Stage 2: train students from a cache — the teacher is never loaded.

``reader`` (cache blocks → batches, and :func:`loader` for any training loop), ``extra_views`` (the
energy-guided extra views as a second stream), ``targets`` (what a loss receives from the cache),
``online`` (the classic online-teacher baseline), ``train``, ``evaluate`` and ``robust`` settings.
Nothing here imports ``kdcache.teacher``.
"""
