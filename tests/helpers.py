"""Shared by the test modules."""

from pglm.cli import main


def error_line(capsys, argv):
    """Run argv; check it fails with exit 2 and exactly one stderr line, no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
