"""Every number of every command line, drawn at random (hypothesis): a flag's value is accepted or
refused by the same rule as the Python API that the value feeds, a refusal is an argparse error
(exit code 2) naming the flag, and every numeric flag has such a rule."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import pkgutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dit
import moe_kernels as mk
from dit.models import DiTConfig, coerce_override
from dit.sampling import check_steps, guided

EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True)
TEXTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=5),
    st.sampled_from(["1e3", "0x10", " 3", "1_000", "", "-0", "0.0", "1e6", "1e6001"]),
)


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every ``python -m dit.<name>`` (each module with a ``main``) and its parser."""
    found = {}
    for info in pkgutil.iter_modules(dit.__path__):
        module = importlib.import_module(f"dit.{info.name}")
        if hasattr(module, "main"):
            assert hasattr(module, "build_parser"), f"dit.{info.name} has a main but no build_parser"
            found[info.name] = module.build_parser()
    return found


def numeric_flags() -> list[tuple[str, list[str], str, argparse.Action]]:
    """``(command, argv that fills the required arguments, flag, action)`` for every flag with a
    numeric value, subcommands included."""
    out = []

    def walk(command: str, parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        required = list(prefix)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(command, sub, [*prefix, name])
            elif not action.option_strings and action.nargs != "?":
                required.append("x")
            elif action.required:
                required += [action.option_strings[0], "x"]
        for action in parser._actions:
            if action.option_strings and action.type in (int, float) or hasattr(action.type, "rule"):
                out.append((command, required, action.option_strings[0], action))

    for command, parser in commands().items():
        walk(command, parser, [])
    return out


FLAGS = numeric_flags()


def test_every_numeric_flag_has_a_rule():
    assert len(FLAGS) > 30
    bare = [f"{command} {flag}" for command, _, flag, action in FLAGS if not hasattr(action.type, "rule")]
    assert not bare, f"numeric flags without a rule: {bare}"


def parse(command: str, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """The parsed namespace (``None`` on an argparse error) and what argparse wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return commands()[command].parse_args(argv), ""
        except SystemExit as exit_info:
            assert exit_info.code == 2
            return None, err.getvalue()


@pytest.mark.parametrize("command, required, flag, action", FLAGS, ids=[f"{c} {f}" for c, _, f, _ in FLAGS])
@EXAMPLES
@given(text=TEXTS)
def test_a_flag_accepts_what_its_rule_accepts(command, required, flag, action, text):
    rule = action.type.rule
    if isinstance(action.nargs, int):  # --cfg-interval LO HI: the value for each
        args, err = parse(command, [*required, flag, *[text] * action.nargs])
    else:
        args, err = parse(command, [*required, f"{flag}={text}"])  # "=": "-1e3" is no option
    try:
        expected = rule.check(flag, int(text) if rule.integer else float(text))
    except (TypeError, ValueError):
        expected = None
    if expected is None:
        # Several values cannot take the "=" form, and argparse reads "-1e3" as an option there.
        bare = isinstance(action.nargs, int) and text.startswith("-")
        assert args is None and (bare or (flag in err and f"expected {rule.wanted}" in err)), err
    else:
        wanted = [expected] * action.nargs if isinstance(action.nargs, int) else expected
        assert args is not None and getattr(args, action.dest) in (wanted, [wanted])


# Flags that feed a Python API: the CLI and the API must accept the same values.
def _moe(**kwargs):
    return mk.MoE(4, 4, 2, 1, num_shared_experts=0, backend="torch", **kwargs)


def _guided(scale):
    model = torch.nn.Module()
    model.config = DiTConfig(class_dropout_prob=0.1)
    return guided(model, torch.zeros(1, dtype=torch.long), scale)


FEEDS = {
    ("train", "--balance-alpha"): lambda v: _moe(balance_loss_alpha=v),
    ("train", "--cfg-scale"): _guided,
    ("sample", "--cfg-scale"): _guided,
    ("analyze", "--cfg-scale"): _guided,
    ("sample", "--time-shift"): lambda v: check_steps(DiTConfig(objective="rectified-flow"), None, None, None, v),
}


@pytest.mark.parametrize("command, flag", sorted(FEEDS), ids=[" ".join(key) for key in sorted(FEEDS)])
@EXAMPLES
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**9), 10**9)))
def test_a_flag_and_the_api_it_feeds_agree(command, flag, value):
    required = next(required for c, required, f, _ in FLAGS if (c, f) == (command, flag))
    cli_accepts = parse(command, [*required, f"{flag}={value!r}"])[0] is not None
    try:
        FEEDS[command, flag](value)
        api_accepts = True
    except ValueError:
        api_accepts = False
    assert cli_accepts == api_accepts


@EXAMPLES
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**9), 10**9)))
def test_model_settings_follow_the_layers_rules(value):
    """``--set balance_loss_alpha=...`` (a DiTConfig field) and ``MoE(balance_loss_alpha=...)``."""
    config = DiTConfig(num_experts=4, top_k=1, hidden_size=8, num_heads=1)
    try:
        config.balance_loss_alpha = coerce_override("balance_loss_alpha", repr(value))
        config.check()
        config_accepts = True
    except (TypeError, ValueError):
        config_accepts = False
    try:
        _moe(balance_loss_alpha=value)
        layer_accepts = True
    except ValueError:
        layer_accepts = False
    assert config_accepts == layer_accepts
