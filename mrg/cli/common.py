"""What the ``mrg`` subcommands share: the console, flag parsing helpers, decoding flags."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 120)


def parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def decoding_of(args: argparse.Namespace):
    from mrg.evaluation.runner import decoding_from_args

    return decoding_from_args(
        args.strategy, args.max_new_tokens, args.num_beams, args.repetition_penalty
    )


def add_decoding_flags(parser: argparse.ArgumentParser, default) -> None:
    """Decoding flags whose defaults come from a ``Decoding`` (the app's, or R2GenGPT's for evaluation)."""
    parser.add_argument(
        "--strategy", default=default.strategy, choices=["greedy", "beam", "sample"]
    )
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=default.num_beams)
    parser.add_argument("--repetition-penalty", type=float, default=default.repetition_penalty)
