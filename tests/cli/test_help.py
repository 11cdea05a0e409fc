"""`upcycle --help` and every subcommand's --help: each option says what it does and shows its default."""

import argparse
import dataclasses
import re

import pytest

from upcycle.cli import COMMANDS, build_parser
from upcycle.recipes import registry
from upcycle.train.config import RECIPE_DEST, TrainConfig


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _train_defaults() -> dict[str, object]:
    """`upcycle train`'s flags default to SUPPRESS (so YAML values survive): the defaults that apply are
    TrainConfig's and the recipes' training options'. Conversion flags have none (no conversion)."""
    out = {f.name: _field_default(f) for f in dataclasses.fields(TrainConfig)}
    for r in registry.load_all():
        for f in dataclasses.fields(r.train_options_cls) if r.train_options_cls else ():
            out.setdefault(RECIPE_DEST + f.name, _field_default(f))
    return out


def _options(command: str):
    """(flag, expanded help, default that applies) of every option of `command` but -h."""
    sub = _subparsers()[command]
    defaults = _train_defaults() if command == "train" else {}
    formatter = sub._get_formatter()
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        default = defaults.get(a.dest) if command == "train" else a.default
        help_text = formatter._expand_help(a) if a.help else a.help
        yield (a.option_strings or [a.dest])[0], a, help_text, default


def _shown(default, text: str) -> bool:
    if isinstance(default, bool):
        return str(default).lower() in text.lower()
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default)) in text
    return str(default) in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_description_and_shows_its_default(command):
    missing, undescribed = [], []
    for flag, action, text, default in _options(command):
        if not text or text == argparse.SUPPRESS or len(re.sub(r"\([^)]*\)", "", text).split()) < 2:
            undescribed.append(flag)
            continue
        flag_only = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if flag_only or default is None or default is False or default == argparse.SUPPRESS or default in ([], {}):
            continue  # store_true / store_false: the default is the flag's absence
        if not _shown(default, text):
            missing.append(f"{flag} (default {default!r}): {text!r}")
    assert not undescribed, f"upcycle {command}: options without a description: {undescribed}"
    assert not missing, f"upcycle {command}: options whose help does not show the default:\n" + "\n".join(missing)


def test_top_level_help_describes_each_subcommand_in_one_line(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(COMMANDS)
    for name, text in helps.items():
        assert text and "\n" not in text and len(text.split()) >= 4, (name, text)
        assert "module" not in text and "subcommand" not in text, (name, text)  # written for users, not developers
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "module" not in out and all(name in out for name in COMMANDS)


def test_eval_baseline_lists_only_the_baselines_that_can_be_applied():
    (_, _, text, _), = [o for o in _options("eval") if o[0] == "--baseline"]
    listed = [n.strip() for n in text.rsplit(": ", 1)[1].split(",")]
    assert listed == list(registry.baselines())
    assert "upcycled" not in listed and "dense-continued" not in listed  # checkpoints, evaluated with --model


def test_convert_calib_steps_defaults_to_the_layer_size():
    args = build_parser().parse_args(["convert", "--model", "m", "--out", "o"])
    assert args.calib_steps is None
    text = next(t for f, _, t, _ in _options("convert") if f == "--calib-steps")
    assert "layer size" in text
