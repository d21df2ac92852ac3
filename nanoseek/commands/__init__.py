"""CLI commands grouped by area. Each module registers its commands with `nanoseek.cli.command` and is
listed in `nanoseek.cli.COMMAND_MODULES`, which `nanoseek` imports in full (a failing import is an error)."""
