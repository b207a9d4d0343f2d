"""``python -m osteogate.gateway`` is the ``osteogate`` command."""

from osteogate.gateway.operate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
