"""Every subcommand's `--help` explains every option, and speaks of the command, not of edgesplit's insides."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from edgesplit.cli import SUBCOMMANDS

# What a user should not need to know: a module path (edgesplit.server.orchestrate) or a source file.
INTERNAL_NAME = re.compile(r"\bedgesplit\.[a-z_]+\.[a-z_]+|\b[a-z_]+\.py\b|\b[A-Z][a-z]+Config\b")


def parser_of(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_has_help_and_no_text_names_an_internal_module(command: str) -> None:
    parser = parser_of(command)
    bare = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not bare, f"edgesplit {command}: options without help: {', '.join(bare)}"
    text = parser.format_help()
    assert not INTERNAL_NAME.findall(text), f"edgesplit {command} --help names {INTERNAL_NAME.findall(text)}"


def test_the_walk_sees_options_without_help() -> None:
    parser = argparse.ArgumentParser(description="see edgesplit.server.orchestrate")
    parser.add_argument("--bare")
    bare = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert bare == ["bare"] and INTERNAL_NAME.search(parser.format_help())
