"""Run the console script's entry point (``logitcache.cli.main.main``) in the test process:
its exit code and stderr, without the seconds a fresh interpreter costs."""

from __future__ import annotations

import sys


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """``logitcache ARGS`` in this process: (exit code, stderr); pytest's ``capsys`` captures."""
    code, _, err = run_main_output(args, capsys)
    return code, err


def run_main_output(args: list[str], capsys) -> tuple[int, str, str]:
    """``logitcache ARGS`` in this process: (exit code, stdout, stderr)."""
    from logitcache.cli.main import main

    argv = sys.argv
    sys.argv = ["logitcache", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code: int, err: str) -> str:
    """The one line a user sees on a user error (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
