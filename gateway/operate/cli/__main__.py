"""``python -m osteogate.gateway.operate.cli``."""

from osteogate.gateway.operate.cli import main

raise SystemExit(main())
