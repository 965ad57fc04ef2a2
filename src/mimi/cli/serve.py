"""`mimi serve`: task files over HTTP on one shared backbone (the server is :mod:`mimi.deploy.server`)."""

from __future__ import annotations

import argparse
import signal
import threading

from mimi.cli.command import Command
from mimi.cli.serving import add_task_args, check_tasks, open_bank
from mimi.core.errors import ConfigError


def _setup(p: argparse.ArgumentParser) -> None:
    add_task_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests run in one batch (default: 32)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: 5)"
    )
    p.add_argument("--max-image-bytes", type=int, default=20_000_000, help="largest request body (default: 20 MB)")
    p.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds a client may stall mid-request (default: 60)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")


def cmd_serve(args: argparse.Namespace) -> int:
    from mimi.deploy.server import BankServer

    if args.max_batch < 1 or args.batch_wait_ms < 0 or args.max_image_bytes < 1 or args.request_timeout <= 0:
        raise ConfigError("--max-batch, --max-image-bytes and --request-timeout must be positive, --batch-wait-ms >= 0")
    names = check_tasks(args.task)
    bank = open_bank(args)
    server = BankServer(
        bank,
        args.host,
        args.port,
        max_batch=args.max_batch,
        wait_ms=args.batch_wait_ms,
        max_image_bytes=args.max_image_bytes,
        access_log=args.access_log,
        request_timeout=args.request_timeout,
    )
    print(
        f"serving {', '.join(names)} on {bank.name} at {server.url} (POST /predict?task=NAME; Ctrl-C stops)", flush=True
    )
    # SIGTERM (docker stop, systemd, kill) stops it as Ctrl-C does: in-flight requests finish, then it exits 0
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    sizes = server.batcher.batch_sizes
    print(f"stopped: {server.batcher.requests} requests in {len(sizes)} batches")
    return 0


COMMANDS = [
    Command(
        "serve",
        "serve task files over HTTP on one shared backbone; concurrent requests share batches",
        _setup,
        cmd_serve,
    )
]
