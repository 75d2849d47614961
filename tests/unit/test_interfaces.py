"""--interface patterns: which make the capture node-wide, what they match, how the CLI reads them."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from exporter.capture.live import match_interfaces
from exporter.config import is_node_wide

HERE = [(1, "lo"), (2, "eth0"), (7, "veth1a2b"), (9, "veth9c"), (12, "cni0")]


@pytest.mark.parametrize(("patterns", "node"), [
    (("lo",), False), (("eth0",), False), (("any",), True), (("veth*",), True), (("eth[01]",), True),
    (("eth0", "lo"), True),
])
def test_several_any_or_a_glob_make_the_capture_node_wide(patterns: tuple[str, ...], node: bool) -> None:
    assert is_node_wide(patterns) is node


def test_patterns_match_interfaces_and_say_which_wait() -> None:
    assert match_interfaces(("veth*", "cni0"), HERE) == ({7: "veth1a2b", 9: "veth9c", 12: "cni0"}, [])
    assert match_interfaces(("any",), HERE) == (dict(HERE), [])
    assert match_interfaces(("cali*", "lo"), HERE) == ({1: "lo"}, ["cali*"])
    assert match_interfaces(("veth9?", "veth?"), HERE) == ({9: "veth9c"}, ["veth?"])  # ? is one character


def test_the_cli_takes_repeats_and_commas_and_refuses_impossible_names() -> None:
    from exporter.cli import _interfaces

    command = click.Command("x", params=[click.Option(["--interface"], multiple=True, callback=_interfaces)],
                            callback=lambda interface: click.echo(repr(interface)))
    runner = CliRunner()
    assert runner.invoke(command, ["--interface", "veth*,cni0", "--interface", "eth0"]).output.strip() == \
        "('veth*', 'cni0', 'eth0')"
    assert runner.invoke(command, []).output.strip() == "('lo',)"
    refused = runner.invoke(command, ["--interface", "averyveryverylongname0"])
    assert refused.exit_code == 2 and "longer than an interface name can be" in refused.output
