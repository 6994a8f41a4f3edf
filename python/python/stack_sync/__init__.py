"""stack_sync: the `stack` sync engine in-process (contract §7).

Keeps a local data stack (parquet tables shared between data packages, and
markdown memory bundles) identical to a server manifest, crash-safely::

    from stack_sync import PullStackOptions, run_stack_sync, audit_invariants

    opts = PullStackOptions(manifest=m, local_dir=p, fetcher=f, md5_of=h, bundle_fetcher=b)
    rep = run_stack_sync(opts)       # rep.direct_tables.added, ...
    opts.manifest = m2               # options are mutable
    violations = audit_invariants(p / "data", json.loads((p / "sync_state.json").read_text()))

Failures raise a `StackError` subclass, one per exit code of the command line:
`StackFailedError` (1), `BadManifestError` (2), `LockedError` (3),
`CorruptJournalError` (4).
"""

from ._native import (
    BadManifestError,
    CorruptJournalError,
    Counts,
    LockedError,
    PullStackOptions,
    ReplayReport,
    StackError,
    StackFailedError,
    SyncReport,
    VerifyReport,
    Violation,
    __version__,
    audit_invariants,
    journal_replay,
    run_stack_sync,
    status,
    verify,
)

__all__ = [
    "BadManifestError",
    "CorruptJournalError",
    "Counts",
    "LockedError",
    "PullStackOptions",
    "ReplayReport",
    "StackError",
    "StackFailedError",
    "SyncReport",
    "VerifyReport",
    "Violation",
    "__version__",
    "audit_invariants",
    "journal_replay",
    "run_stack_sync",
    "status",
    "verify",
]
