"""The `umcd` command line: one typer app; each module in `umcd.commands` adds its subcommands.

Command modules import heavy libraries (torch, faiss) inside their functions, so that
light commands such as `umcd submit` start fast and never load torch.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

import umcd.commands

app = typer.Typer(
    name="umcd",
    help="UMCD fleet: unsupervised multi-criteria adversarial detection for deep-hashing image search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(umcd.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"umcd.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def main() -> None:
    """The ``umcd`` program: the typer app, with a bad ``UMCD_*`` variable told in one line per variable (exit 2)
    instead of a traceback, whichever command read the settings."""
    from umcd.settings import settings_problems

    try:
        app()
    except Exception as exc:  # noqa: BLE001 - only settings errors are turned into messages; the rest re-raised
        problems = settings_problems(exc)
        if problems is None:
            raise
        sys.stderr.write("umcd: bad settings in the environment:\n" + "".join(f"  {line}\n" for line in problems))
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
