"""``python -m ftrain``: the ``ftrain`` command (see :mod:`ftrain.cli`)."""

from ftrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
