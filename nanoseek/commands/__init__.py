"""CLI commands grouped by area; each module registers its commands with `nanoseek.cli.command`."""
