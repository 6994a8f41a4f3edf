"""The CLI package the reference suite imports its engine from (cli.lib.pull_sync)."""
