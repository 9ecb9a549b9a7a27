#!/usr/bin/env python3
"""Loopback deployment: a real SuperLink and SuperNodes over gRPC on 127.0.0.1, then
``flwr run`` (options, TLS, node auth and the state file: :mod:`fedpeft.deploy`)."""

from fedpeft.deploy import main

if __name__ == "__main__":
    raise SystemExit(main())
