"""User representations: learn one dense embedding per user offline, serve and refresh it online."""

__version__ = "0.1.0"
