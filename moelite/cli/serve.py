"""`moelite serve`: the OpenAI-compatible HTTP server (moelite.serve.server) over one engine.

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` checks every flag and that the port can be bound
(`port 8000 on 127.0.0.1 is in use; pick another with --port`) before the model loads, then serves until SIGTERM /
SIGINT and returns 0.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from moelite.cli.flags import (add_engine_flags, add_model_flag, engine_config, nonneg_float, port_number,
                               positive_float, positive_int)

NAME = "serve"
HELP = "OpenAI-compatible HTTP server with continuous batching"


def add_arguments(p) -> None:
    from moelite.serve.scheduler import MODES, ON_MISS, SchedulerConfig

    d = SchedulerConfig()
    add_model_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only unless told otherwise)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MOELITE_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: the folder name)")
    p.add_argument("--scheduler", choices=MODES, default=d.mode, help="admission policy")
    p.add_argument("--on-miss", choices=ON_MISS, default=d.on_miss,
                   help="a request that cannot meet its SLO: 429 early, or serve it with --degrade-alpha")
    p.add_argument("--degrade-alpha", type=float, default=d.degrade_alpha,
                   help="substitution alpha in [0, 1) of a degraded request")
    p.add_argument("--slo-config", default=None, metavar="JSON",
                   help="JSON with per-task ttft_s, tpot_s, expected_tokens (default: the built-in task table)")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="sequences decoded together")
    p.add_argument("--token-budget", type=positive_int, default=None,
                   help="T_max: sum of prompt + max_tokens admitted (default: max batch x the model's context)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 429")
    p.add_argument("--request-timeout", type=positive_float, default=300.0, help="seconds per request")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable; default: none)")
    p.add_argument("--drain-timeout", type=nonneg_float, default=60.0,
                   help="seconds to finish in-flight work on SIGTERM")
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a connection has to send a request's headers, after it opens or after a response")
    p.add_argument("--keep-alive", type=positive_float, default=5.0,
                   help="idle seconds between requests on one connection")
    p.add_argument("--max-connections", type=positive_int, default=1024,
                   help="open connections at once; more get 503 (keep it under the open-file limit)")
    p.add_argument("--no-profile", action="store_true", help="skip the start-up cost profile")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level")
    add_engine_flags(p)


def check_port(host: str, port: int) -> None:
    """ValueError when (host, port) cannot be bound, with what to do about it; port 0 (any free port) always can."""
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"--host: {host!r} is not an address this machine can bind ({exc.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use; pick another with --port") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ValueError(f"port {port} on {host} needs privileges; pick one above 1023 with --port") from None
            raise ValueError(f"--host: cannot bind {host}:{port} ({exc.strerror})") from None


def run(args) -> int:
    if args.request_timeout > 86400 or args.drain_timeout > 3600 or args.header_timeout > 3600 \
            or args.keep_alive > 3600:
        raise ValueError("--request-timeout must be at most 86400 seconds, and --drain-timeout, --header-timeout "
                         "and --keep-alive at most 3600")
    if args.max_body_bytes < 256:
        raise ValueError(f"--max-body-bytes: {args.max_body_bytes} must be >= 256")
    config = engine_config(args)
    check_port(args.host, args.port)  # before the model loads: a busy port is one line, not a minute later
    from moelite.engine import Engine
    from moelite.serve.scheduler import SchedulerConfig
    from moelite.serve.server import ServerSettings, exit_process, serve

    kw = dict(mode=args.scheduler, on_miss=args.on_miss, degrade_alpha=args.degrade_alpha, max_batch=args.max_batch,
              token_budget=args.token_budget)
    sched = SchedulerConfig.load(args.slo_config, **kw) if args.slo_config else SchedulerConfig(**kw).validate()
    settings = ServerSettings(host=args.host, port=args.port,
                              api_key=args.api_key or os.environ.get("MOELITE_API_KEY") or None,
                              model_name=args.model_name, max_queue=args.max_queue,
                              request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                              cors_origins=args.cors_origin, drain_timeout_s=args.drain_timeout,
                              header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
                              max_connections=args.max_connections, profile=not args.no_profile, scheduler=sched)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = Engine(args.model, config, progress=True)  # the load's progress bar goes to stderr, like the log
    if engine.budget_note:  # what 'auto' resolved to, or that a budget holds every expert (as generate says)
        print(f"moelite: {engine.budget_note}", file=sys.stderr, flush=True)
    print(f"moelite: serving {settings.model_name or engine.path.name} on http://{settings.host}:{settings.port} "
          f"(scheduler {sched.mode}, max batch {sched.max_batch}, key {'on' if settings.api_key else 'off'})",
          file=sys.stderr, flush=True)
    serve(engine, settings, args.log_level)
    # The server has stopped and drained: end the process now. Interpreter teardown (thread pools, torch) takes a
    # second or more, with Python's signal handlers already reset, so a second SIGTERM then would kill the process
    # (status -15) instead of the documented 143; nothing is left to write.
    logging.shutdown()
    exit_process(0)
