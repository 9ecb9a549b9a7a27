#!/usr/bin/env python3
"""A fedpeft deployment across emulated hosts and links (network namespaces + tbf) on one
Linux machine, with per-round interface bytes beside fedpeft's message bytes (options:
:mod:`fedpeft.netdeploy`; topology: :mod:`fedpeft.netfed`). Needs root and iproute2."""

from fedpeft.netdeploy import main

if __name__ == "__main__":
    raise SystemExit(main())
