"""A click group whose subcommands are imported only when one is run, so `tieremu --help` and `tieremu topo` do
not pay for torch, numpy or matplotlib. Each entry carries its one-line help so that listing needs no import;
tests/test_cli.py checks that line against the command's own docstring."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click

from tieremu.errors import TieremuError


@dataclass(frozen=True)
class LazyCommand:
    """Where a subcommand lives ("module:attribute") and the short help `--help` lists for it."""

    target: str
    short_help: str

    def load(self) -> click.Command:
        module, _, attribute = self.target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.target} is not a click command")
        return command


class LazyGroup(click.Group):
    """Loads a subcommand from `lazy` on first use; prints a TieremuError as one clear line and exits 2."""

    def __init__(self, *args: object, lazy: dict[str, LazyCommand] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.add_command(self.lazy[cmd_name].load(), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The listing of loaded commands comes from click; lazy ones from their entry, without importing them.
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                limit = formatter.width - 6 - len(name)
                rows.append((name, _shorten(self.lazy[name].short_help, limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TieremuError as exc:
            click.echo(f"tieremu: error: {exc}", err=True)
            sys.exit(2)


def _shorten(text: str, limit: int) -> str:
    """As click shortens a command's help in a listing: whole words, then an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: max(0, limit - 3)].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + "..."
