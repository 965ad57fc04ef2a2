"""`mimi serve` on uvicorn + Starlette: the HTTP contract, readiness and metrics, tasks followed in a folder and
changed through the admin API, bounded work, and load behaviour on loopback (bounded in count and time)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from test_bank import bare, make_task
from test_serve import _cli_task, _png, _read_reply

import mimi
from mimi.cli import main

uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn, starlette) is not installed")
from mimi.cli.serve import listen  # noqa: E402
from mimi.deploy.asgi import BankService, ServeOptions, create_app  # noqa: E402
from mimi.deploy.batcher import AsyncBatcher  # noqa: E402

TASKS = {"a": ("mimi", 3), "b": ("lora", 4), "c": ("linear", 5)}


def _request(url: str, body: bytes | None = None, *, method: str | None = None, headers=None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, {"text": raw.decode(errors="replace")}, hdrs


def _bank(tmp_path: Path) -> mimi.AdapterBank:
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    for name, (kind, classes) in TASKS.items():
        make_task("vit", kind, classes, tmp_path / f"{name}.safetensors", seed=ord(name))
        bank.add(name, tmp_path / f"{name}.safetensors")
    return bank


@contextlib.contextmanager
def running(service: BankService):
    """The app served by uvicorn on a free loopback port, in a thread; stopped (drained) on exit."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and service.ready):
        assert time.monotonic() < deadline, "the server did not become ready within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture
def served(tmp_path):
    bank = _bank(tmp_path)
    service = BankService(bank, ServeOptions(max_image_bytes=50_000, max_image_pixels=10_000, request_timeout=1.0))
    with running(service) as (url, port):
        yield url, port, service, bank


def _expected(bank, body: bytes, task: str, topk: int) -> dict:
    with Image.open(io.BytesIO(body)) as img:
        return bank.predict(img, task, topk)[0]


def test_contract_answers_equal_the_bank_and_errors_are_json(served):
    url, port, service, bank = served
    status, got, _ = _request(f"{url}/predict?task=a&topk=2", _png(1))
    want = _expected(bank, _png(1), "a", 2)
    assert status == 200 and [got[k] for k in ("task", "ids", "names")] == [want[k] for k in ("task", "ids", "names")]
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
    labels = [p["label"] for p in got["predictions"]]
    assert [p["id"] for p in got["predictions"]] == want["ids"] and labels == [str(i) for i in want["ids"]]
    assert [p["score"] for p in got["predictions"]] == pytest.approx(want["probs"])
    # a multipart/form-data upload (curl -F file=@x.png, an HTML form) is the same image
    boundary = "mimi-test-boundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + _png(1)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, up, _ = _request(
        f"{url}/predict?task=a&topk=2", form, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200 and up["ids"] == got["ids"] and up["probs"] == pytest.approx(got["probs"])
    big = io.BytesIO()
    Image.new("RGB", (200, 100)).save(big, format="PNG")  # 20,000 pixels > 10,000, but few bytes
    cases = [
        (f"{url}/predict?task=nope", _png(0), 400, "unknown task 'nope'"),
        (f"{url}/predict?task=a&topk=0", _png(0), 400, "topk must be a positive integer"),
        (f"{url}/predict?task=a", b"not an image", 400, "not an image file"),
        (f"{url}/predict?task=a", b"", 400, "empty body"),
        (f"{url}/predict?task=a", b"x" * 60_000, 413, "the limit is 50,000"),
        (f"{url}/predict?task=a", big.getvalue(), 413, "200x100 pixels"),
        (f"{url}/nowhere", _png(0), 404, "no such path /nowhere"),
    ]
    for target, body, code, says in cases:
        status, err, _ = _request(target, body)
        assert status == code and says in err["error"] and "\n" not in err["error"], (target, err)
    status, err, _ = _request(f"{url}/predict", method="GET")
    assert status == 405 and "GET is not allowed" in err["error"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # no Content-Length, not chunked
        s.sendall(b"POST /predict?task=a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).decode().startswith("HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # announces 1,000 bytes, sends 10
        s.sendall(b"POST /predict?task=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        reply = _read_reply(s)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply
    status, tasks, _ = _request(f"{url}/tasks")
    assert status == 200 and set(tasks) == set(TASKS) and tasks["b"]["method"] == "lora"
    status, health, _ = _request(f"{url}/health")
    assert status == 200 and health["ok"] and health["tasks"] == list(TASKS)
    assert _request(f"{url}/ready")[0] == 200
    assert service.batcher.requests == 2  # refused requests never reached the model


def test_metrics_in_prometheus_text_format(served):
    url, _, _, _ = served
    for _ in range(3):
        assert _request(f"{url}/predict?task=b", _png(2))[0] == 200
    assert _request(f"{url}/predict?task=zzz", _png(2))[0] == 400
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    assert 'mimi_requests_total{status="200",task="b"} 3.0' in text
    assert 'mimi_requests_total{status="400",task="unknown"} 1.0' in text
    for name in ("mimi_request_seconds_bucket", "mimi_batch_size_bucket", "mimi_queue_depth", "mimi_tasks_loaded 3.0"):
        assert name in text
    assert "mimi_task_load_failures_total 0.0" in text and "mimi_ready 1.0" in text


def test_a_full_queue_answers_503_with_retry_after(tmp_path, monkeypatch):
    bank = _bank(tmp_path)
    slow = bank.logits

    def logits(*a, **k):
        time.sleep(0.3)  # the model is busy: requests pile up behind it
        return slow(*a, **k)

    monkeypatch.setattr(bank, "logits", logits)
    service = BankService(bank, ServeOptions(max_batch=1, batch_wait_ms=0, max_queue=2))
    with running(service) as (url, _):
        results: list[tuple[int, dict]] = []

        def one() -> None:
            status, body, hdrs = _request(f"{url}/predict?task=a", _png(3))
            results.append((status, hdrs.get("Retry-After") or hdrs.get("retry-after")))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    codes = sorted(s for s, _ in results)
    assert len(results) == 8 and set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 3
    assert all(retry == "1" for s, retry in results if s == 503)


def test_requests_queued_before_a_removal_are_answered_by_that_task(tmp_path):
    """The batcher runs a change to the bank after the requests queued before it."""
    bank = _bank(tmp_path)
    x = bank.preprocess([Image.open(io.BytesIO(_png(4)))])[0]

    async def go():
        batcher = AsyncBatcher(bank, max_batch=4, wait_ms=50)
        try:
            pending = [asyncio.ensure_future(batcher.submit(x, "c", 1)) for _ in range(6)]
            await asyncio.sleep(0)  # the six are queued
            removal = asyncio.wrap_future(batcher.change(lambda b: b.remove("c")))
            answers = await asyncio.gather(*pending)
            await removal
            with pytest.raises(KeyError):
                await batcher.submit(x, "c", 1)
            return answers
        finally:
            batcher.close()

    answers = asyncio.run(go())
    assert [a["task"] for a in answers] == ["c"] * 6 and "c" not in bank


def test_a_batch_takes_requests_while_they_keep_coming(tmp_path):
    """Requests arriving one wait apart or less join the batch past the first window (at most 4 waits in all):
    clients answered together come back spread out, and a fixed window would split them over two batches."""
    bank = _bank(tmp_path)
    x = bank.preprocess([Image.open(io.BytesIO(_png(4)))])[0]
    sizes: list[int] = []

    async def go():
        batcher = AsyncBatcher(bank, max_batch=8, wait_ms=150, on_batch=lambda n, _: sizes.append(n))
        try:
            pending = []
            for _ in range(4):  # 0, 60, 120, 180 ms: the last after the first 150 ms window, within 4 x 150 ms
                pending.append(asyncio.ensure_future(batcher.submit(x, "a", 1)))
                await asyncio.sleep(0.06)
            await asyncio.gather(*pending)
            await asyncio.sleep(0.7)  # past every window: the next request opens a batch of its own
            await batcher.submit(x, "a", 1)
        finally:
            batcher.close()

    asyncio.run(go())
    assert sizes == [4, 1], sizes


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the poll interval"
        time.sleep(0.05)


def test_task_dir_is_followed_while_serving(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    folder = tmp_path / "tasks"
    folder.mkdir()
    bank = _bank(files)
    for name in ("b", "c"):
        bank.remove(name)
    make_task("vit", "mimi", 3, files / "d1.safetensors", seed=11)
    make_task("vit", "adapter", 3, files / "d2.safetensors", seed=12)
    shutil.copy(files / "a.safetensors", folder / "x.safetensors")
    service = BankService(bank, ServeOptions(task_dir=folder, poll_seconds=0.1))
    with running(service) as (url, _):
        assert "x" in bank  # loaded before /ready said 200
        shutil.copy(files / "d1.safetensors", folder / ".d.safetensors.tmp")  # an atomic write, in two steps
        os.replace(folder / ".d.safetensors.tmp", folder / "d.safetensors")
        _wait(lambda: "d" in bank)
        first = _request(f"{url}/predict?task=d&topk=3", _png(5))[1]
        assert first["probs"] == pytest.approx(_expected(bank, _png(5), "d", 3)["probs"])
        before = _request(f"{url}/tasks")[1]["d"]["adapter_params"]
        shutil.copy(files / "d2.safetensors", folder / ".d.safetensors.tmp")  # a changed file replaces the task
        os.replace(folder / ".d.safetensors.tmp", folder / "d.safetensors")
        _wait(lambda: _request(f"{url}/tasks")[1]["d"]["adapter_params"] != before)
        second = _request(f"{url}/predict?task=d&topk=3", _png(5))[1]
        assert second["probs"] != pytest.approx(first["probs"])
        (folder / "broken.safetensors").write_bytes(b"not a task file")  # logged and counted, bank unchanged
        _wait(lambda: service.metrics.task_load_failures._value.get() == 1)
        assert set(bank.tasks) == {"a", "x", "d"}
        (folder / "d.safetensors").unlink()
        _wait(lambda: "d" not in bank)
        status, err, _ = _request(f"{url}/predict?task=d", _png(5))
        assert status == 400 and "unknown task 'd'" in err["error"]


def test_admin_api_is_off_without_a_token_and_checks_it(tmp_path, served):
    url, _, _, bank = served
    make_task("vit", "adapter", 3, tmp_path / "new.safetensors", seed=9)
    body = (tmp_path / "new.safetensors").read_bytes()
    status, err, _ = _request(f"{url}/tasks/new", body, method="PUT")
    assert status == 403 and "--admin-token" in err["error"]
    (tmp_path / "t2").mkdir()
    service = BankService(_bank(tmp_path / "t2"), ServeOptions(admin_token="s3cret-token"))
    with running(service) as (url2, _):
        auth = {"Authorization": "Bearer s3cret-token"}
        assert _request(f"{url2}/tasks/new", body, method="PUT", headers={"Authorization": "Bearer nope"})[0] == 401
        status, got, _ = _request(f"{url2}/tasks/new", body, method="PUT", headers=auth)
        assert status == 200 and "new" in got["tasks"]
        assert _request(f"{url2}/predict?task=new", _png(1))[0] == 200
        status, err, _ = _request(f"{url2}/tasks/bad", b"junk", method="PUT", headers=auth)
        assert status == 400 and "not added" in err["error"] and "bad" not in service.bank
        assert _request(f"{url2}/tasks/new", method="DELETE", headers=auth)[0] == 200
        assert "new" not in service.bank and _request(f"{url2}/tasks/new", method="DELETE", headers=auth)[0] == 404


# ---------------------------------------------------------------- load behaviour (loopback, bounded)


async def _client(port: int, jobs: list[tuple[str, bytes]], out: list, deadline: float) -> None:
    """One keep-alive HTTP/1.1 client sending its jobs back to back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for task, body in jobs:
            if time.monotonic() > deadline:
                out.append((task, body, 0, None))
                continue
            head = f"POST /predict?task={task}&topk=2 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            data = await reader.readexactly(int(headers.get("content-length", 0)))
            out.append((task, body, int(status_line.split()[1]), json.loads(data)))
    finally:
        writer.close()


def _load(port: int, jobs: list[tuple[str, bytes]], clients: int, seconds: float) -> list:
    out: list = []

    async def go():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, jobs[i::clients], out, deadline) for i in range(clients)))

    asyncio.run(go())
    return out


def test_64_clients_2000_requests_all_answered_as_alone(tmp_path):
    bank = _bank(tmp_path)
    images = [_png(i) for i in range(8)]
    alone = {(t, i): _expected(bank, img, t, 2) for t in TASKS for i, img in enumerate(images)}
    rng = random.Random(0)
    picks = [(rng.choice(list(TASKS)), rng.randrange(len(images))) for _ in range(2000)]
    service = BankService(bank, ServeOptions(max_batch=32, batch_wait_ms=2))
    with running(service) as (_, port):
        out = _load(port, [(t, images[i]) for t, i in picks], clients=64, seconds=240)
    assert len(out) == 2000
    assert all(status == 200 for _, _, status, _ in out), sorted({s for _, _, s, _ in out})
    by_body = {img: i for i, img in enumerate(images)}
    for task, body, _, got in out:
        want = alone[(task, by_body[body])]
        assert got["ids"] == want["ids"] and got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    assert service.batcher.batches < 2000  # concurrent requests shared backbone passes


def test_500_stalled_connections_do_not_delay_a_normal_request(served):
    url, port, _, _ = served
    t0 = time.perf_counter()
    assert _request(f"{url}/predict?task=a", _png(1))[0] == 200
    alone = time.perf_counter() - t0
    stalled = []
    try:
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /predict?task=a HTTP/1.1\r\nHost: x\r\nContent-Le")  # headers never finished
            stalled.append(s)
        t0 = time.perf_counter()
        assert _request(f"{url}/predict?task=a", _png(1))[0] == 200
        assert time.perf_counter() - t0 < alone + 1.0
    finally:
        for s in stalled:
            s.close()


def _serve_cli(tmp_path, *extra: str) -> tuple[subprocess.Popen, int]:
    task = _cli_task(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mimi", "serve", "--task", f"t={task}", "--port", "0", "--device", "cpu", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    url = lines[1].split(" at ")[1].split()[0]
    deadline = time.monotonic() + 60
    while _request(f"{url}/ready")[0] != 200:
        assert time.monotonic() < deadline and proc.poll() is None, lines
        time.sleep(0.05)
    return proc, int(url.rsplit(":", 1)[1])


def test_sigterm_with_32_requests_queued_answers_them_then_exits_0(tmp_path):
    proc, port = _serve_cli(tmp_path, "--max-batch", "64", "--batch-wait-ms", "1500")
    try:
        out: list = []
        thread = threading.Thread(target=lambda: out.extend(_load(port, [("t", _png(i)) for i in range(32)], 32, 60)))
        thread.start()
        time.sleep(0.7)  # all 32 accepted; the batch waits up to 1.5 s for more
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert len(out) == 32 and all(status == 200 for _, _, status, _ in out)
    assert "stopped: 32 requests in 1 batches" in stdout


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_over_10000_requests(tmp_path):
    proc, port = _serve_cli(tmp_path)
    try:
        jobs = [("t", _png(i % 16)) for i in range(1000)]
        assert all(s == 200 for _, _, s, _ in _load(port, jobs, 16, 120))  # warm-up
        warm = _rss_kb(proc.pid)
        for _ in range(9):
            assert all(s == 200 for _, _, s, _ in _load(port, jobs, 16, 120))
        after = _rss_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert after <= 1.10 * warm, (warm, after)


def test_bad_port_or_host_is_one_line(tmp_path, capsys):
    task = _cli_task(tmp_path)
    for flag, value, says in (("--port", "70000", "a port is 0..65535"), ("--host", "no-such-host.invalid", "--host")):
        assert main(["serve", "--task", f"t={task}", flag, value, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert main(["serve", "--device", "cpu"]) == 2
    assert "nothing to serve" in capsys.readouterr().err


def test_accepted_connections_have_nagle_off():
    """asyncio sets TCP_NODELAY on accepted sockets only when the listening socket names IPPROTO_TCP; without it a
    kept-alive response waits for the client's delayed ACK (~40 ms each)."""
    sock = listen("127.0.0.1", 0)
    seen: list[int] = []

    async def serve_once():
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(serve_once())
    assert sock.proto == socket.IPPROTO_TCP
    assert len(seen) == 1 and seen[0] != 0, seen


def test_the_stdlib_server_keeps_its_first_import_path():
    from mimi.deploy.server import BankServer as first
    from mimi.deploy.stdlib_server import BankServer

    assert first is BankServer


def test_two_replicas_over_one_task_folder_both_pick_up_a_new_file(tmp_path):
    """The scale-out story: two `mimi serve --task-dir` processes, one shared folder, no coordination."""
    task = _cli_task(tmp_path)
    folder = tmp_path / "shared"
    folder.mkdir()
    shutil.copy(task, folder / "first.safetensors")
    replicas = []
    try:
        for _ in range(2):  # --task-dir alone: the backbone is the one the folder's files record
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            argv = [sys.executable, "-m", "mimi", "serve", "--task-dir", str(folder), "--poll-seconds", "0.2"]
            proc = subprocess.Popen(
                [*argv, "--port", "0", "--device", "cpu"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            lines = [proc.stdout.readline() for _ in range(2)]
            url = next(ln for ln in lines if " at http://" in ln).split(" at ")[1].split()[0]
            replicas.append((proc, url))
        for _, url in replicas:
            _wait(lambda url=url: _request(f"{url}/ready")[0] == 200, timeout=60)
        shutil.copy(task, folder / ".second.tmp")
        os.replace(folder / ".second.tmp", folder / "second.safetensors")
        answers = []
        for _, url in replicas:
            _wait(lambda url=url: "second" in _request(f"{url}/tasks")[1], timeout=30)
            status, got, _ = _request(f"{url}/predict?task=second&topk=2", _png(7))
            assert status == 200
            answers.append(got)
        assert answers[0]["ids"] == answers[1]["ids"] and answers[0]["probs"] == pytest.approx(answers[1]["probs"])
    finally:
        for proc, _ in replicas:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in replicas:
            proc.communicate(timeout=60)
    assert [proc.returncode for proc, _ in replicas] == [0, 0]


def test_a_large_jpeg_is_decoded_at_reduced_size(served):
    """PIL's draft mode: a 1600x1600 JPEG for a 32 px backbone is decoded at 1/8 scale, and answered like the
    same picture sent small (both resized to the backbone's input)."""
    url, _, service, bank = served
    service.options.max_image_pixels, service.options.max_image_bytes = 4_000_000, 2_000_000
    img = Image.new("RGB", (1600, 1600))
    for y in range(0, 1600, 200):
        for x in range(0, 1600, 200):
            img.paste(((x // 7) % 256, (y // 7) % 256, 90), (x, y, x + 200, y + 200))
    big = io.BytesIO()
    img.save(big, "JPEG", quality=95)
    decoded: list[tuple[int, int]] = []
    real = bank.pixels
    bank.pixels = lambda images: decoded.extend(i.size for i in images) or real(images)
    try:
        status, got, _ = _request(f"{url}/predict?task=a&topk=3", big.getvalue())
    finally:
        bank.pixels = real
    assert status == 200 and decoded == [(200, 200)], decoded
    small = io.BytesIO()
    img.resize((200, 200), Image.Resampling.BICUBIC).save(small, "JPEG", quality=95)
    with Image.open(small) as s:
        want = bank.predict(s, "a", 3)[0]
    assert got["ids"] == want["ids"]
