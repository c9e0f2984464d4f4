"""%verify: arguments are checked in the cell, with clear errors."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from gradient_nb.notebook.verify_magic import VerifyMagics, parse_rate


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.register_magics(VerifyMagics)
    return shell


def test_rates():
    assert parse_rate("0.05") == 0.05
    assert parse_rate("5%") == pytest.approx(0.05)
    for bad in ("x", "150%", "-0.1", "2"):
        with pytest.raises(UsageError):
            parse_rate(bad)


@pytest.mark.parametrize("line", ["", "nope", "policy", "policy 3", "request", "last --layers x",
                                  "reputation extra"])
def test_bad_lines_are_usage_errors(ip, line):
    with pytest.raises(UsageError):
        ip.run_line_magic("verify", line)


def test_nothing_served_yet_is_a_clear_error(ip):
    with pytest.raises(UsageError, match="no served model"):
        ip.run_line_magic("verify", "last")
    with pytest.raises(UsageError, match="cell body is the prompt"):
        ip.run_cell_magic("verify", "ask", "  ")
