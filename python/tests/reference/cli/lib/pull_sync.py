"""`cli.lib.pull_sync`, the module the reference suite
(`test_pull_sync_invariants.py`, beside `cli/`) was written against: its three
names, re-exported from `stack_sync`, which replaces the engine it named."""

from stack_sync import PullStackOptions, audit_invariants, run_stack_sync

__all__ = ["PullStackOptions", "audit_invariants", "run_stack_sync"]
