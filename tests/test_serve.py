"""`mimi serve`: concurrent requests for different tasks share batches, answers equal the bank's own, bad requests
get a JSON error and leave the server serving, the command starts and stops cleanly."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from test_bank import bare, make_task

import mimi
from mimi.cli import main
from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.deploy.stdlib_server import BankServer

TASKS = {"a": ("mimi", 3), "b": ("lora", 4), "c": ("linear", 5)}


def _read_reply(s: socket.socket) -> str:
    """One HTTP response read off a raw socket: the headers, then Content-Length bytes of body (the two may
    arrive in separate segments, Nagle being off)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(4096)
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        (int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"), 0
    )
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (i * 20 % 256, 100, 200 - i * 10)).save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(tmp_path):
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    for name, (kind, classes) in TASKS.items():
        make_task("vit", kind, classes, tmp_path / f"{name}.safetensors", seed=ord(name))
        bank.add(name, tmp_path / f"{name}.safetensors")
    srv = BankServer(bank, port=0, max_batch=16, wait_ms=300, max_image_bytes=50_000, request_timeout=1.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.close()
    thread.join()


def test_concurrent_mixed_requests_share_batches_and_match_the_bank(server):
    jobs = [(i, "abc"[i % 3]) for i in range(12)]
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i: int, task: str) -> None:
        answers[i] = _post(f"{server.url}/predict?task={task}&topk=2", _png(i))

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bank = server.bank
    for i, task in jobs:
        status, got = answers[i]
        assert status == 200, got
        want = bank.predict(Image.open(io.BytesIO(_png(i))), task, topk=2)[0]
        assert got["task"] == task and got["ids"] == want["ids"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    sizes = server.batcher.batch_sizes
    assert sum(sizes) == 12 and len(sizes) < 12 and max(sizes) > 1  # requests arriving together ran together
    status, health = _get(f"{server.url}/health")
    assert status == 200 and health == {"ok": True, "tasks": ["a", "b", "c"], "requests": 12, "batches": len(sizes)}


def test_bad_requests_get_one_json_error_and_the_server_goes_on(server):
    url = server.url
    cases = [
        (f"{url}/predict?task=zzz", _png(0), 400, "unknown task 'zzz'"),
        (f"{url}/predict", _png(0), 400, "unknown task ''"),
        (f"{url}/predict?task=a&topk=0", _png(0), 400, "topk must be a positive integer"),
        (f"{url}/predict?task=a", b"not an image", 400, "not an image file"),
        (f"{url}/predict?task=a", b"", 400, "empty body"),
        (f"{url}/predict?task=a", b"x" * 60_000, 413, "the limit is 50,000"),
        (f"{url}/nowhere", _png(0), 404, "no such path /nowhere"),
    ]
    for target, body, code, says in cases:
        status, got = _post(target, body)
        assert status == code and says in got["error"] and "\n" not in got["error"], (target, got)
    assert _get(f"{url}/nowhere")[0] == 404
    status, tasks = _get(f"{url}/tasks")
    assert status == 200 and set(tasks) == {"a", "b", "c"} and tasks["b"]["method"] == "lora"
    # a client that announces 1,000 bytes and stalls after 10 gets a 408 once the timeout passes
    with socket.create_connection(server.server_address[:2], timeout=30) as stalled:
        stalled.sendall(b"POST /predict?task=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        reply = _read_reply(stalled)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply
    status, got = _post(f"{url}/predict?task=b", _png(3))
    assert status == 200 and got["task"] == "b"
    assert server.batcher.requests == 1  # refused requests never reached the model


def _cli_task(tmp_path):
    """A task file on timm's test_vit, recording its backbone file, as `mimi train --weights FILE` writes one."""
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    model = timm.create_model("test_vit", img_size=32, num_classes=0)
    model.load_state_dict(mimi.core.taskfile.load_tensors(weights))
    model.reset_classifier(3)
    add_adapters(model, AdapterConfig(hidden_dim=4, init_seed=1))
    meta = {"method": "adapter", "model": "test_vit", "img_size": "32", "weights_source": str(weights)}
    mimi.save_adapters(model, tmp_path / "t.safetensors", metadata=meta)
    return tmp_path / "t.safetensors"


def test_cli_serves_then_stops_on_sigterm(tmp_path):
    task = _cli_task(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mimi", "serve", "--task", f"t={task}", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "as the task files record" in lines[0], lines
        assert "(float32 backbone, 1 torch threads) at http://" in lines[1], lines
        url = lines[1].split(" at ")[1].split()[0]
        status, got = _post(f"{url}/predict?task=t&topk=3", _png(1))
        assert status == 200 and len(got["ids"]) == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: 1 requests in 1 batches" in out


def test_cli_refuses_a_port_in_use_in_one_line(tmp_path, capsys):
    task = _cli_task(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--task", f"t={task}", "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "--port" in err[0], err
    assert main(["serve", "--task", f"t={task}", "--task", f"t={task}"]) == 2
    assert "--task names must be unique" in capsys.readouterr().err
