"""Helpers for the command-line tests: run ``gptforge`` in-process and check its one-line errors.

Import as ``from tests.cli_utils import run, assert_one_line_error`` (pytest runs with --import-mode=importlib).
"""

from gptforge.cli import EXIT_USER_ERROR, main


def run(capsys, *argv):
    """Run ``gptforge *argv`` in-process; return (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    """The exit code is the user-error one and stderr has exactly one ``error:`` line, containing ``fragment``."""
    assert code == EXIT_USER_ERROR
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
