"""The command-line layer: click and rich live here and nowhere below (DESIGN.md, layer 10)."""

from tieremu.cli.root import main

__all__ = ["main"]
