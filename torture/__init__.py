"""Reliability torture: kills, power cuts, contention, injected faults and corrupt files.

A cache may lose its contents by design, but it may never return wrong bytes, never lose
a write it acknowledged as durable, and never take the application down. This module
checks those three promises the hard way, and prints the figures::

    python -m torture --kills 500 --corruptions 1000 --seconds 30 --seed 1

It is a harness of the source tree, not part of the installed library: run it from the
repository's root (children are started as `python -m torture` there). It uses the
library only through its public API (`vyre_sqlcache`), and `apsw` directly for its VFS
shims and for damaging files.

Four kinds of trials, each also run with small counts by the test suite:

- **kills** (`run_kills`): a child process writes, overwrites, invalidates and flushes
  in a loop, logging every call before it makes it and every acknowledgement after; it
  is killed with SIGKILL at random moments (some while it starts or opens the file). Half
  the rounds also cut the power: the child does its I/O through `SyncTrackingVFS`, and
  `power_cut` then puts back every file as of its last sync. After each kill the file
  must pass `integrity_check`, and every key must read as its last acknowledged version
  (committed for a kill, flushed for a power cut) or a later, unacknowledged one.
- **contention** (`run_contention`): processes run mixed reads, writes, batches,
  invalidations and flushes on one small-capped file: no error may reach a caller, a
  read returns a miss or bytes written for that key, a process's own write is never
  gone unless something was evicted meanwhile, and the cap holds after every write.
- **faults** (`run_faults`): `FaultyVFS` fails reads, writes or syncs, or reports a full
  disk, on chosen calls. Every public call must return, raise a `CacheError`, or miss;
  once the faults stop the same cache object must work, and the file must be sound.
- **corruptions** (`run_corruptions`): copies of a populated cache (closed cleanly, or
  with a write-ahead log left as by a crash) get random bytes, whole pages of chosen
  b-trees, the header, WAL frames or the length damaged; a worker process opens and reads
  each one. It must never crash, never return wrong bytes, and heal or raise as documented.

The lifecycle trials (`lifecycle.py`: fork, Ctrl-C) and the deletion trials
(`deletions.py`: the file, its main file alone or its folder deleted while threads
write, read and flush) run in child processes too.
"""

from __future__ import annotations

from .command import main
from .common import FINGERPRINT, FileCheck, check_file, entry_key_of, read_slot, write_slots
from .contention import ContentionReport, run_contention
from .corruption import (
    CorruptionReport,
    Template,
    TrialWorker,
    corruption_trial,
    damage,
    make_template,
    run_corruptions,
    trial_in_subprocess,
)
from .deletions import DeletionReport, run_deletions
from .faults import FaultReport, run_faults
from .kills import KillReport, run_kills
from .shims import FaultPlan, FaultyVFS, SyncTrackingVFS, mark_synced, power_cut

__all__ = [
    "FINGERPRINT",
    "ContentionReport",
    "CorruptionReport",
    "DeletionReport",
    "FaultPlan",
    "FaultReport",
    "FaultyVFS",
    "FileCheck",
    "KillReport",
    "SyncTrackingVFS",
    "Template",
    "TrialWorker",
    "check_file",
    "corruption_trial",
    "damage",
    "entry_key_of",
    "main",
    "make_template",
    "mark_synced",
    "power_cut",
    "read_slot",
    "run_contention",
    "run_corruptions",
    "run_deletions",
    "run_faults",
    "run_kills",
    "trial_in_subprocess",
    "write_slots",
]
