"""`mimi serve`: task files over HTTP on one shared backbone (an ASGI app, :mod:`mimi.deploy.asgi`, run by uvicorn).

Concurrent requests for any tasks share one backbone pass. ``--task-dir DIR`` serves every task file in DIR and
follows it while serving (files added, replaced, removed within ``--poll-seconds``).
"""

from __future__ import annotations

import argparse
import signal
import socket
from pathlib import Path

from mimi.cli.command import Command
from mimi.cli.serving import add_task_args, check_tasks
from mimi.core.errors import ConfigError


def _setup(p: argparse.ArgumentParser) -> None:
    add_task_args(p, required=False)
    p.add_argument(
        "--task-dir", type=Path, metavar="DIR", help="serve every task file in DIR and follow it (name = stem)"
    )
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often --task-dir is looked at (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests run in one batch (default: 32)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for another request, again after each arrival, at most 4x in all (default: 5)",
    )
    p.add_argument("--max-queue", type=int, default=1024, help="most requests waiting; 503 past it (default: 1024)")
    p.add_argument("--max-image-bytes", type=int, default=20_000_000, help="largest request body (default: 20 MB)")
    p.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="largest image, in pixels (default: 40 million)"
    )
    p.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds a client may stall mid-request (default: 60)"
    )
    p.add_argument("--admin-token", default=None, help="turn on PUT/DELETE /tasks/NAME for this Bearer token")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on ``host:port``; a one-line :class:`ConfigError` for a port or host that cannot be used."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0..65535 (0 picks a free one)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror}); use e.g. 127.0.0.1") from e
    family, type_, proto, _, address = infos[0]
    # The protocol must be named (IPPROTO_TCP): asyncio turns Nagle off (TCP_NODELAY) only on such sockets, and
    # without it every kept-alive response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, type_, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(backlog)  # a burst of connections waits here instead of being reset
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from e
    return sock


def _open_bank(args: argparse.Namespace, names: list[str]):
    """The bank: on the backbone the --task files (or, without them, the --task-dir files) record, or --backbone."""
    from mimi.deploy.bank import AdapterBank
    from mimi.deploy.taskdir import TaskDir
    from mimi.deploy.tasks import read_task_file, serving_backbone

    files = [read_task_file(path) for _, path in args.task]
    if not files and args.task_dir is not None:
        for _, (path, _) in TaskDir(args.task_dir).listing().items():
            try:
                files.append(read_task_file(path))
            except Exception:  # noqa: BLE001 (a bad file in the folder is reported when the server adds it)
                continue
    if not files and args.backbone is None:
        raise ConfigError(f"--task-dir {args.task_dir} holds no readable task file yet; name the backbone (--backbone)")
    rec = serving_backbone(files, backbone=args.backbone, weights=args.weights, img_size=args.img_size)
    kw = {"weights": rec.weights, "img_size": rec.img_size, "device": args.device}
    bank = AdapterBank(rec.model, **kw, backbone_dtype=args.backbone_dtype)
    for name, path in args.task:
        bank.add(name, path)
    if args.backbone is None:
        print(f"backbone {bank.name} (weights {bank.weights_source}, {bank.img_size} px), as the task files record")
    if bank.backbone_dtype != "float32":
        print(bank.quantized.describe())
    return bank


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from mimi.deploy.asgi import BankService, ServeOptions, create_app
    from mimi.deploy.taskdir import TaskDir

    if not args.task and args.task_dir is None:
        raise ConfigError("nothing to serve: give --task NAME=FILE (repeat) and/or --task-dir DIR")
    options = ServeOptions(
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        request_timeout=args.request_timeout,
        task_dir=args.task_dir,
        poll_seconds=args.poll_seconds,
        admin_token=args.admin_token,
    )
    names = check_tasks(args.task)
    if args.task_dir is not None:
        TaskDir(args.task_dir)  # the folder exists: checked before the backbone loads
    sock = listen(args.host, args.port)  # a busy port fails before the backbone loads
    try:
        bank = _open_bank(args, names)
        service = BankService(bank, options)
        config = uvicorn.Config(
            create_app(service),
            log_level="info" if args.access_log else "warning",
            access_log=args.access_log,
            lifespan="on",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=max(30.0, args.request_timeout),
        )
        server = _server(config, service)
        host, port = sock.getsockname()[:2]
        what = (
            ", ".join(names)
            + (" + " if names and args.task_dir else "")
            + (f"{args.task_dir}/" if args.task_dir else "")
        )
        print(
            f"serving {what} on {bank.name} ({bank.backbone_dtype} backbone, {torch.get_num_threads()} torch threads) "
            f"at http://{host}:{port} "
            "(POST /predict?task=NAME; Ctrl-C stops)",
            flush=True,
        )
        # uvicorn re-raises the signal that stopped it once it has drained, under the handlers found at start:
        # no-op handlers make a drained shutdown (SIGTERM, Ctrl-C) a clean exit 0, as systemd and docker expect.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])  # SIGTERM or Ctrl-C: stop accepting, answer what is queued, then return
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        sock.close()
    b = service.batcher
    print(f"stopped: {b.requests if b else 0} requests in {b.batches if b else 0} batches")
    return 0


def _server(config, service):
    """uvicorn's server, telling the service when a shutdown starts (``/ready`` then answers 503)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.set_draining()
            super().handle_exit(sig, frame)

    return Server(config)


COMMANDS = [
    Command(
        "serve",
        "serve task files over HTTP on one shared backbone; concurrent requests share batches",
        _setup,
        cmd_serve,
    )
]
