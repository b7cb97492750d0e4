"""Subcommands of `umcd`; each module defines `register(app)` and imports heavy code lazily."""
