"""The ``mrg`` command line (``main.main``; its sub-commands in ``generate``, ``evaluate``
and ``training``).

This face only hands the names on, as ``transformers.models.llama`` does.
"""

from mrg.cli.main import build_parser, demo_command, main

__all__ = ["build_parser", "demo_command", "main"]
