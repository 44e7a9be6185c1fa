"""`gammaray --help` and each subcommand's help describe every subcommand and option."""

from __future__ import annotations

import pytest

from gammaray.app.cli import build_parser

pytestmark = pytest.mark.foundation


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action
    raise AssertionError("no subcommands")


def test_top_level_help_lists_every_subcommand(capsys):
    parser = build_parser()
    sub = _subparsers(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for name in sub.choices:
        assert name in out
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert all(helps.get(n) for n in sub.choices), helps


@pytest.mark.parametrize("command", ["demo", "prepare", "pretrain", "config"])
def test_every_option_has_help(command, capsys):
    parser = build_parser()
    sub = _subparsers(parser).choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    out = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in out


def test_demo_help_describes_the_stages(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    out = capsys.readouterr().out
    for word in ("S3", "prepare", "Ray Data", "DeepSpeed", "R@1", "--storage", "--json"):
        assert word in out
