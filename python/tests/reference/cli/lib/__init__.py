"""See cli/lib/pull_sync.py."""
