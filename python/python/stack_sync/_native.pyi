"""Type stubs of the compiled part of stack_sync (see __init__.py)."""

import os
from pathlib import Path
from typing import Any, Callable, ClassVar, List, Mapping, Optional, Union

__version__: str

StrPath = Union[str, "os.PathLike[str]"]
Fetcher = Callable[[str, Path], object]
Md5Of = Callable[[Path], str]
BundleFetcher = Callable[[str], Union[bytes, bytearray]]

class StackError(Exception):
    """A stack operation failed; `exit_code` is the command line's exit code."""

    exit_code: int
    kind: str

class StackFailedError(StackError):
    """Exit code 1: the operation failed and the previous stack is intact."""

    exit_code: ClassVar[int]

class BadManifestError(StackError):
    """Exit code 2: bad usage or a bad manifest; nothing was touched."""

    exit_code: ClassVar[int]

class LockedError(StackError):
    """Exit code 3: another process holds the directory's lock."""

    exit_code: ClassVar[int]

class CorruptJournalError(StackError):
    """Exit code 4: the journal is corrupt; nothing was changed."""

    exit_code: ClassVar[int]

class PullStackOptions:
    """Options of `run_stack_sync`; every attribute can be set after construction.

    `manifest` is a dict shaped as contract §1 (then the callables fetch and hash;
    each is optional, and without `md5_of` the engine hashes the bytes itself) or
    a path or URL string (its folder or server is the origin, as for
    `stack pull --manifest`; the callables must then be None). `link` as
    `--link`; `jobs` parallel downloads; `wait` for the directory's lock;
    `bundle_check` "auto" (a bundle's md5 is a version tag for a dict manifest,
    and is verified for a manifest named by a path or URL), "verify" or "trust".
    """

    manifest: Union[Mapping[str, Any], StrPath]
    local_dir: Path
    fetcher: Optional[Fetcher]
    md5_of: Optional[Md5Of]
    bundle_fetcher: Optional[BundleFetcher]
    link: str
    jobs: int
    wait: bool
    bundle_check: str

    def __init__(
        self,
        manifest: Union[Mapping[str, Any], StrPath],
        local_dir: StrPath,
        fetcher: Optional[Fetcher] = None,
        md5_of: Optional[Md5Of] = None,
        bundle_fetcher: Optional[BundleFetcher] = None,
        link: str = "auto",
        jobs: int = 4,
        wait: bool = False,
        bundle_check: str = "auto",
    ) -> None: ...

class Counts:
    added: int
    updated: int
    removed: int
    unchanged: int
    skipped: int

class SyncReport:
    ok: bool
    dry_run: bool
    txn: int
    direct_tables: Counts
    data_packages: Counts
    memory_domains: Counts
    bytes_fetched: int
    elapsed_ms: int
    recovered: List[str]
    warnings: List[str]

class Violation:
    invariant: int
    kind: str
    path: str
    message: str

class VerifyReport:
    ok: bool
    violations: List[Violation]
    notes: List[str]

class ReplayReport:
    txn: int
    notes: List[str]
    warnings: List[str]

def run_stack_sync(opts: PullStackOptions) -> SyncReport:
    """Pull `opts.manifest` into `opts.local_dir`.

    The engine runs with the GIL released, so other Python threads run
    meanwhile. The callables are called from the engine's staging workers, not
    one at a time: up to `opts.jobs` threads call `fetcher`, `md5_of` and
    `bundle_fetcher` (and `md5_of` also from the threads that re-check files
    whose stat changed), each call holding the GIL, so calls interleave wherever
    a callable releases it (I/O, `time.sleep`). The first exception a callable
    raises stops the pull before its commit point (nothing visible changes) and
    is the `__cause__` of the `StackError` raised. Ctrl-C stops the pull
    crash-safely (before its commit point, at the next file; past it, the pull
    finishes) and raises `KeyboardInterrupt`.
    """

def status(opts: PullStackOptions) -> SyncReport:
    """What `run_stack_sync(opts)` would do, changing nothing."""

def audit_invariants(local_data: StrPath, state: Mapping[str, Any]) -> List[str]:
    """Violations of invariants 1-4 in `local_data` against a parsed state; [] when all hold."""

def verify(local_dir: StrPath, contents: bool = False) -> VerifyReport:
    """Check invariants 1-5 of the directory (`stack verify`). Reads only."""

def journal_replay(local_dir: StrPath, wait: bool = False) -> ReplayReport:
    """Finish or roll back an interrupted pull; rebuild sync_state.json."""
