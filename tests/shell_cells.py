"""Running cells in the test IPython shell (tests/magics/conftest.py's ``ip``) as a notebook does."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError


def run(ip, source: str) -> Any:
    """Run one cell as a notebook does; re-raise what it raised, else return the cell's value."""
    result = ip.run_cell(source)
    error = result.error_before_exec or result.error_in_exec
    if error is not None:
        raise error
    return result.result


def usage_error(ip, capsys, source: str) -> str:
    """Run a failing cell; it must fail with IPython's UsageError shown as one line, no traceback."""
    capsys.readouterr()
    result = ip.run_cell(source)
    captured = capsys.readouterr()
    assert isinstance(result.error_in_exec, UsageError), repr(
        result.error_in_exec or result.error_before_exec
    )
    shown = captured.out + captured.err
    assert "Traceback" not in shown, shown
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    assert lines[0].startswith("UsageError: "), shown
    return str(result.error_in_exec)
