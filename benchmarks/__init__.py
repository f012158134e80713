"""Benchmark suite of vyre-sqlcache against the stores it replaces or rivals.

Run ``python -m benchmarks --help``. Modules: ``files_store`` (port of vyre's
file-per-blob cache), ``stores`` (one adapter per store), ``workloads`` (what
is timed), ``child`` (fresh-process measurements), ``runner`` (rounds,
rotation, medians) and ``report`` (Markdown, JSON, PNG). ``corpus`` is its own
command, ``python -m benchmarks.corpus``: compression on real compiler output.
"""
