"""The package's own tests: stack_sync's API (contract §7) beyond the reference
suite — options, reports, manifests given as paths, exceptions and their
chaining, the GIL, Ctrl-C, a moved directory."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import stack_sync
from stack_sync import (
    BadManifestError,
    CorruptJournalError,
    LockedError,
    PullStackOptions,
    StackError,
    StackFailedError,
    audit_invariants,
    run_stack_sync,
)

# ---------------------------------------------------------------------------
# Fixtures: an origin of tables and bundles, as a dict manifest with callables
# and as a folder with a manifest file.
# ---------------------------------------------------------------------------


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def table(tid: str, name: str, body: bytes) -> Dict:
    return {
        "id": tid,
        "name": name,
        "md5": md5(body),
        "query_mode": "local",
        "parquet_url": f"/api/data/{tid}/{md5(body)}/download",
    }


class Origin:
    """Bodies by table id and domain slug, served by the callables or a folder."""

    def __init__(self, tables: Dict[str, bytes], bundles: Dict[str, bytes]):
        self.tables = tables
        self.bundles = bundles

    def manifest(self, direct=(), packages=None, domains=()) -> Dict:
        return {
            "direct_tables": [table(t, t.replace("tbl_", ""), self.tables[t]) for t in direct],
            "data_packages": [
                {
                    "id": f"id_{slug}",
                    "slug": slug,
                    "name": slug,
                    "tables": [table(t, t.replace("tbl_", ""), self.tables[t]) for t in ts],
                }
                for slug, ts in (packages or {}).items()
            ],
            "memory_domains": [
                {"slug": s, "md5": md5(self.bundles[s])} for s in domains
            ],
        }

    def fetcher(self, url: str, dest: Path) -> None:
        tid = url.split("/")[3]
        dest.write_bytes(self.tables[tid])

    def bundle_fetcher(self, slug: str) -> bytes:
        return self.bundles[slug]

    def write_folder(self, root: Path, manifest: Dict) -> Path:
        """The manifest and its files in a folder, the manifest's origin."""
        for t in manifest["direct_tables"] + [
            t for p in manifest["data_packages"] for t in p["tables"]
        ]:
            f = root / t["parquet_url"].lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(self.tables[t["id"]])
        for d in manifest["memory_domains"]:
            f = root / "api" / "memory" / d["slug"] / "bundle.md"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(self.bundles[d["slug"]])
        path = root / "manifest.json"
        path.write_text(json.dumps(manifest))
        return path


def base_origin() -> Origin:
    return Origin(
        {f"tbl_{c}": f"table {c}, version 1\n".encode() for c in "abcd"},
        {"finance": b"# finance\n", "ops": b"# ops\n"},
    )


def base_manifest(o: Origin) -> Dict:
    return o.manifest(
        direct=["tbl_a"],
        packages={"p1": ["tbl_a", "tbl_b"], "p2": ["tbl_a", "tbl_c"]},
        domains=["finance"],
    )


def options(o: Origin, manifest, local_dir: Path, **kw) -> PullStackOptions:
    return PullStackOptions(
        manifest=manifest,
        local_dir=local_dir,
        fetcher=o.fetcher,
        bundle_fetcher=o.bundle_fetcher,
        **kw,
    )


def visible(local_dir: Path) -> List[Tuple]:
    """Everything a user sees in the directory (not `.stack/`): paths, kinds,
    bytes, symlink targets and modes, and the state file."""
    out = []
    for root, dirs, files in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if d != ".stack")
        for name in sorted(dirs + files):
            p = Path(root) / name
            st = p.lstat()
            rel = str(p.relative_to(local_dir))
            if p.is_symlink():
                out.append((rel, "link", os.readlink(p)))
            elif p.is_dir():
                out.append((rel, "dir", st.st_mode))
            else:
                out.append((rel, "file", st.st_mode, p.read_bytes()))
    return out


def assert_clean(local_dir: Path) -> None:
    state = json.loads((local_dir / "sync_state.json").read_text())
    assert audit_invariants(local_dir / "data", state) == []
    rep = stack_sync.verify(local_dir, contents=True)
    assert rep.ok, rep.violations


def counts(c) -> Tuple[int, ...]:
    return (c.added, c.updated, c.removed, c.unchanged, c.skipped)


# ---------------------------------------------------------------------------
# The API's shape
# ---------------------------------------------------------------------------


def test_exports_version_and_stubs():
    assert isinstance(stack_sync.__version__, str) and stack_sync.__version__
    pkg = Path(stack_sync.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_native.pyi").exists()
    codes = {
        stack_sync.StackFailedError: 1,
        stack_sync.BadManifestError: 2,
        stack_sync.LockedError: 3,
        stack_sync.CorruptJournalError: 4,
    }
    for cls, code in codes.items():
        assert issubclass(cls, StackError) and issubclass(cls, Exception)
        assert cls.exit_code == code


def test_options_are_mutable_and_checked(tmp_path):
    o = base_origin()
    opts = options(o, base_manifest(o), str(tmp_path / "s"))
    assert opts.local_dir == tmp_path / "s" and isinstance(opts.local_dir, Path)
    assert (opts.link, opts.jobs, opts.wait, opts.bundle_check) == ("auto", 4, False, "auto")
    assert opts.md5_of is None and opts.fetcher == o.fetcher
    opts.manifest = {"direct_tables": []}
    opts.link, opts.jobs, opts.wait = "copy", 2, True
    opts.md5_of = lambda p: md5(p.read_bytes())
    opts.local_dir = tmp_path / "t"
    assert opts.manifest == {"direct_tables": []}
    assert (opts.link, opts.jobs, opts.wait) == ("copy", 2, True)
    assert opts.local_dir == tmp_path / "t"
    with pytest.raises(ValueError, match="link"):
        opts.link = "teleport"
    with pytest.raises(ValueError, match="jobs"):
        opts.jobs = 0
    with pytest.raises(TypeError, match="fetcher"):
        opts.fetcher = "not callable"
    with pytest.raises(TypeError, match="manifest"):
        opts.manifest = 42
    with pytest.raises(ValueError, match="bundle_check"):
        PullStackOptions({}, tmp_path, bundle_check="sometimes")
    assert opts.link == "copy", "a refused value leaves the attribute as it was"
    assert "PullStackOptions(" in repr(opts)


def test_dict_manifest_report_state_and_audit(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local)  # no md5_of: the engine hashes
    rep = run_stack_sync(opts)
    assert rep.ok and not rep.dry_run and rep.txn >= 1
    assert counts(rep.direct_tables) == (1, 0, 0, 0, 0)
    assert counts(rep.data_packages) == (4, 0, 0, 0, 0)
    assert counts(rep.memory_domains) == (1, 0, 0, 0, 0)
    assert rep.bytes_fetched > 0
    state = json.loads((local / "sync_state.json").read_text())
    root = os.path.realpath(local)
    assert state["version"] == 2 and state["root"] == root
    e = state["data_packages"]["p1"]["tbl_b"]
    assert e["ref_path"] == f"{root}/data/p1/b.parquet"
    assert e["shared_path"] == f"{root}/data/_shared/tbl_b.parquet"
    assert Path(e["ref_path"]).read_bytes() == o.tables["tbl_b"]
    assert_clean(local)
    # A stray file is a violation of the audit (invariant 3).
    (local / "data" / "p1" / "stray.parquet").write_bytes(b"x")
    found = audit_invariants(local / "data", state)
    assert len(found) == 1 and "stray.parquet" in found[0]
    (local / "data" / "p1" / "stray.parquet").unlink()
    # An empty state ({}: no state file) against the pulled files: every one is
    # untracked or an orphan; against an empty directory, nothing is wrong.
    assert len(audit_invariants(local / "data", {})) > 0
    assert audit_invariants(tmp_path / "nothing" / "data", {}) == []
    with pytest.raises(TypeError, match="mapping"):
        audit_invariants(local / "data", [state])
    # Status changes nothing; an update, then a removal, are counted.
    before = visible(local)
    opts.manifest = o.manifest(direct=["tbl_a", "tbl_d"], packages={"p1": ["tbl_b"]})
    st = stack_sync.status(opts)
    assert st.dry_run and counts(st.direct_tables) == (1, 0, 0, 1, 0)
    assert visible(local) == before
    rep = run_stack_sync(opts)
    assert counts(rep.direct_tables) == (1, 0, 0, 1, 0)
    assert counts(rep.data_packages) == (0, 0, 3, 1, 0)
    assert counts(rep.memory_domains) == (0, 0, 1, 0, 0)
    assert not (local / "memory" / "finance").exists()
    assert_clean(local)


def test_callables_run_on_worker_threads(tmp_path):
    o = base_origin()
    main = threading.get_ident()
    seen = set()

    def fetcher(url, dest):
        seen.add(threading.get_ident())
        o.fetcher(url, dest)

    opts = options(o, base_manifest(o), tmp_path / "s", jobs=3)
    opts.fetcher = fetcher
    run_stack_sync(opts)
    assert seen and main not in seen


def test_manifest_path_pulls_from_its_folder(tmp_path):
    o = base_origin()
    path = o.write_folder(tmp_path / "origin", base_manifest(o))
    local = tmp_path / "s"
    for manifest in (str(path), path):  # a str and an os.PathLike
        rep = run_stack_sync(PullStackOptions(manifest, local))
        assert rep.ok
    assert counts(rep.data_packages) == (0, 0, 0, 4, 0)
    assert (local / "memory" / "finance" / "bundle.md").read_bytes() == o.bundles["finance"]
    assert_clean(local)


def test_callables_with_a_manifest_path_are_refused(tmp_path):
    o = base_origin()
    path = o.write_folder(tmp_path / "origin", base_manifest(o))
    local = tmp_path / "s"
    with pytest.raises(BadManifestError, match="fetcher") as e:
        run_stack_sync(options(o, str(path), local))
    assert e.value.exit_code == 2
    assert not local.exists()


def test_bad_manifest_touches_nothing(tmp_path):
    local = tmp_path / "s"
    local.mkdir()
    bad = {"direct_tables": [{"id": "../x", "name": "x", "md5": "0" * 32}]}
    with pytest.raises(BadManifestError) as e:
        run_stack_sync(PullStackOptions(bad, local))
    assert e.value.exit_code == 2 and e.value.kind == "bad_manifest"
    assert "../x" in str(e.value)
    assert list(local.iterdir()) == []
    with pytest.raises(BadManifestError, match="JSON") as e:
        run_stack_sync(PullStackOptions({"direct_tables": [object()]}, local))
    assert isinstance(e.value.__cause__, TypeError)
    # A manifest file that cannot be read is an I/O failure (exit 1), as on the
    # command line: the path may be right and the disk or its permissions wrong.
    missing = tmp_path / "missing.json"
    with pytest.raises(StackFailedError) as e:
        run_stack_sync(PullStackOptions(str(missing), local))
    assert e.value.exit_code == 1 and e.value.kind == "io"
    assert str(missing) in str(e.value)
    assert list(local.iterdir()) == []


def test_a_file_in_the_way_is_exit_1_and_touches_nothing(tmp_path):
    # A file where the engine needs a folder: refused before the commit point,
    # naming it (the error's kind is in_the_way, exit 1).
    o = base_origin()
    local = tmp_path / "s"
    rep = run_stack_sync(options(o, base_manifest(o), local))
    assert rep.warnings == []
    (local / "data" / "p3").write_bytes(b"mine")
    before = visible(local)
    m = base_manifest(o)
    m["data_packages"].append(
        {"id": "id_p3", "slug": "p3", "name": "p3", "tables": [table("tbl_d", "d", o.tables["tbl_d"])]}
    )
    with pytest.raises(StackFailedError) as e:
        run_stack_sync(options(o, m, local))
    assert e.value.exit_code == 1 and e.value.kind == "in_the_way"
    assert "data/p3" in str(e.value)
    assert visible(local) == before


# ---------------------------------------------------------------------------
# Exceptions in callables: chained, and nothing visible changes.
# ---------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("which", ["fetcher", "md5_of", "bundle_fetcher", "md5_type"])
def test_exception_in_a_callable_changes_nothing(tmp_path, which):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local, md5_of=lambda p: md5(p.read_bytes()))
    run_stack_sync(opts)
    before = visible(local)
    # The next manifest changes a table, adds one and a domain.
    o.tables["tbl_b"] = b"table b, version 2\n"
    o.tables["tbl_e"] = b"table e\n"
    opts.manifest = o.manifest(
        direct=["tbl_a", "tbl_e"],
        packages={"p1": ["tbl_a", "tbl_b"], "p2": ["tbl_a", "tbl_c"]},
        domains=["finance", "ops"],
    )
    boom = Boom("the server is down")

    def raising(*args):
        raise boom

    if which == "md5_type":
        opts.md5_of = lambda p: 12345
    else:
        setattr(opts, which, raising)
    with pytest.raises(StackFailedError) as e:
        run_stack_sync(opts)
    assert e.value.exit_code == 1
    if which == "md5_type":
        assert isinstance(e.value.__cause__, TypeError)
        assert "md5_of must return a str" in str(e.value.__cause__)
    else:
        assert e.value.__cause__ is boom
        assert which in str(e.value)
    assert visible(local) == before
    assert_clean(local)
    # The stack is whole: the next pull with working callables succeeds.
    opts.fetcher, opts.bundle_fetcher = o.fetcher, o.bundle_fetcher
    opts.md5_of = None
    rep = run_stack_sync(opts)
    assert counts(rep.direct_tables) == (1, 0, 0, 1, 0)
    assert_clean(local)


def test_missing_fetcher_fails_before_anything_changes(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local)
    run_stack_sync(opts)
    before = visible(local)
    opts.fetcher = None
    opts.manifest = o.manifest(direct=["tbl_a", "tbl_d"])
    with pytest.raises(StackFailedError, match="fetcher is None"):
        run_stack_sync(opts)
    assert visible(local) == before


def test_locked_directory(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local)
    run_stack_sync(opts)
    with open(local / ".stack" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError) as e:
            run_stack_sync(opts)
        assert e.value.exit_code == 3 and e.value.kind == "locked"
        # With wait, the pull waits for the lock, then runs.
        opts.wait = True
        timer = threading.Timer(0.3, lambda: fcntl.flock(held, fcntl.LOCK_UN))
        timer.start()
        rep = run_stack_sync(opts)
        timer.join()
    assert rep.ok


def test_corrupt_journal(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local)
    run_stack_sync(opts)
    opts.manifest = o.manifest(direct=["tbl_b"])
    run_stack_sync(opts)
    journal = local / ".stack" / "journal"
    data = bytearray(journal.read_bytes())
    data[40] ^= 0xFF  # inside the first record, followed by whole records
    journal.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError) as e:
        stack_sync.journal_replay(local)
    assert e.value.exit_code == 4 and "corrupt" in str(e.value)


# ---------------------------------------------------------------------------
# Threads, the GIL and Ctrl-C
# ---------------------------------------------------------------------------


def test_a_python_thread_runs_during_a_4000_reference_pull(tmp_path):
    """The engine releases the GIL: a pure-Python thread keeps running while a
    pull of 4,000 references (2,000 tables in two packages) from a manifest path
    runs, and sees the pull midway: its journal begun, its state file not yet
    written. Were the GIL held through the pull, the thread could only look
    before it (no journal) or after it (a state file)."""
    tables = {f"tbl_{i:04d}": f"table {i}\n".encode() for i in range(2000)}
    o = Origin(tables, {})
    manifest = o.manifest(packages={"p1": sorted(tables), "p2": sorted(tables)})
    path = o.write_folder(tmp_path / "origin", manifest)
    local = tmp_path / "s"
    journal, state = local / ".stack" / "journal", local / "sync_state.json"
    looks = {"midway": 0, "all": 0}
    stop = threading.Event()

    def watcher():
        while not stop.is_set():
            looks["all"] += 1
            if journal.exists() and not state.exists():
                looks["midway"] += 1

    t = threading.Thread(target=watcher)
    t.start()
    try:
        rep = run_stack_sync(PullStackOptions(str(path), local))
    finally:
        stop.set()
        t.join()
    assert counts(rep.data_packages) == (4000, 0, 0, 0, 0)
    assert looks["midway"] > 0, looks
    assert_clean(local)


def test_ctrl_c_stops_the_pull_and_raises_keyboard_interrupt(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local, jobs=1)
    run_stack_sync(opts)
    before = visible(local)
    for i in range(40):
        o.tables[f"tbl_x{i}"] = f"table x{i}\n".encode()
    opts.manifest = o.manifest(direct=[f"tbl_x{i}" for i in range(40)])
    calls = []

    def slow_fetcher(url, dest):
        calls.append(url)
        if len(calls) == 1:
            # Ctrl-C, as the terminal sends it (Python's handler only notes it;
            # the waiting caller raises it).
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        o.fetcher(url, dest)

    opts.fetcher = slow_fetcher
    with pytest.raises(KeyboardInterrupt):
        run_stack_sync(opts)
    assert len(calls) < 40, "the pull stopped at the next file"
    assert visible(local) == before
    assert_clean(local)
    opts.fetcher = o.fetcher
    rep = run_stack_sync(opts)
    assert counts(rep.direct_tables) == (40, 0, 1, 0, 0)  # tbl_a left
    assert_clean(local)


def test_ctrl_c_while_waiting_for_the_lock(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local, wait=True)
    run_stack_sync(opts)
    opts.manifest = o.manifest(direct=["tbl_d"])
    with open(local / ".stack" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            run_stack_sync(opts)
        timer.join()
    assert not (local / "data" / "_direct" / "d.parquet").exists()


# ---------------------------------------------------------------------------
# A moved directory (contract §3)
# ---------------------------------------------------------------------------


def test_a_moved_directory_is_re_projected_by_the_next_pull(tmp_path):
    o = base_origin()
    local = tmp_path / "s"
    opts = options(o, base_manifest(o), local)
    run_stack_sync(opts)
    moved = tmp_path / "moved"
    shutil.move(str(local), str(moved))
    # The old state names the old place; read-only commands work where it is now.
    old_state = json.loads((moved / "sync_state.json").read_text())
    found = audit_invariants(moved / "data", old_state)
    assert len(found) == 1 and "projected for" in found[0], found
    rep = stack_sync.verify(moved, contents=True)
    assert rep.ok and any("projected for" in n for n in rep.notes)
    opts.local_dir = moved
    rep = run_stack_sync(opts)
    assert counts(rep.data_packages) == (0, 0, 0, 4, 0)
    state = json.loads((moved / "sync_state.json").read_text())
    root = os.path.realpath(moved)
    assert state["root"] == root
    for e in list(state["direct_tables"].values()) + [
        e for p in state["data_packages"].values() for e in p.values()
    ]:
        assert e["ref_path"].startswith(root + "/") and Path(e["ref_path"]).exists()
    assert_clean(moved)
    assert stack_sync.verify(moved).notes == []
