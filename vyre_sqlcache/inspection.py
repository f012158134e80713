"""What `PipelineCache`'s inspection and maintenance methods return.

`PipelineCache.query()` gives a list of `QueryResult`; `PipelineCache.check()` gives a
`CheckReport`. The command line (`vyre-sqlcache`) is built on these methods.
"""

from __future__ import annotations

from ._rows import CheckReport, QueryResult

__all__ = ["CheckReport", "QueryResult"]
