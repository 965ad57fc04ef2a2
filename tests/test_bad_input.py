"""The bad-input catalogue: every case exits 2 with one error line last on stderr, and leaves nothing behind.

Each case writes its own tiny VTAB-1k-layout task, breaks it (or the command line) in one way, runs the real CLI
in-process, and checks: exit code 2; the last stderr line is ``mimi <command>: error: ...`` naming the problem;
no traceback; no run folder, no partial file, no cache entry (the data folder is unchanged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file
from vtab_fixture import write_vtab_task

from mimi.cli import main

TRAIN = "--model test_vit --img-size 32 --batch-size 16 --device cpu --seed 0 --no-progress --data vtab1k:toy"
MIMI = "--method mimi --adapter-dim 8 --budget-params 600 --epochs 1 --first-epochs 1"


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")} if folder.exists() else {}


def _lines(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


# ---------------------------------------------------------------- how each case breaks the data (root -> None)


def _no_root(root):
    return {"data_root": root / "nowhere"}


def _wrong_layout(root):
    (root / "toy").rename(root / "other")


def _split_missing(root):
    (root / "toy" / "test.txt").unlink()


def _split_empty(root):
    (root / "toy" / "train800.txt").write_text("")


def _missing_image(root):
    _lines(root / "toy" / "val200.txt", lambda ls: ls + ["images/ghost.png 1"])


def _corrupt_image(root):
    (root / "toy" / "images" / "train800_0003.png").write_bytes(b"not a png at all")


def _truncated_image(root):
    p = root / "toy" / "images" / "test_0002.png"
    p.write_bytes(p.read_bytes()[:40])


def _label_not_int(root):
    _lines(root / "toy" / "train800.txt", lambda ls: [ls[0].rsplit(" ", 1)[0] + " cat"] + ls[1:])


def _label_negative(root):
    _lines(root / "toy" / "train800.txt", lambda ls: [ls[0].rsplit(" ", 1)[0] + " -1"] + ls[1:])


def _label_gap(root):
    _lines(root / "toy" / "test.txt", lambda ls: [ls[0].rsplit(" ", 1)[0] + " 999"] + ls[1:])


def _absolute_path(root):
    _lines(root / "toy" / "train800.txt", lambda ls: [f"{root / 'toy' / ls[0].split()[0]} 0"] + ls[1:])


def _dotdot_path(root):
    (root / "outside.png").write_bytes((root / "toy" / "images" / "train800_0000.png").read_bytes())
    _lines(root / "toy" / "train800.txt", lambda ls: ["../outside.png 0"] + ls[1:])


def _symlink_escape(root):
    (root / "outside.png").write_bytes((root / "toy" / "images" / "train800_0000.png").read_bytes())
    os.symlink(root / "outside.png", root / "toy" / "images" / "link.png")
    _lines(root / "toy" / "train800.txt", lambda ls: ["images/link.png 0"] + ls[1:])


DATA_CASES = {
    "data root missing": (_no_root, "does not exist"),
    "wrong layout": (_wrong_layout, "no such task folder"),
    "split file missing": (_split_missing, "test.txt does not exist"),
    "split file empty": (_split_empty, "empty"),
    "missing image": (_missing_image, "ghost.png does not exist"),
    "corrupt image": (_corrupt_image, "train800_0003.png"),
    "truncated image": (_truncated_image, "test_0002.png"),
    "label not an integer": (_label_not_int, "integer label"),
    "negative label": (_label_negative, "integer label"),
    "label gap": (_label_gap, "999"),
    "absolute path": (_absolute_path, "absolute"),
    "dot-dot path": (_dotdot_path, "outside the task folder"),
    "symlink escaping": (_symlink_escape, "outside the task folder"),
}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_one_line(code: int, err: list[str], command: str, expect: str) -> None:
    assert code == 2, err
    assert err, "no error printed"
    assert err[-1].startswith(f"mimi {command}: error: "), err
    assert expect.lower() in err[-1].lower(), err[-1]
    assert not any("Traceback" in line for line in err)
    assert len(err) <= 4  # warnings may come before the error; stderr stays a few lines


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(case, tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data")
    breaker, expect = DATA_CASES[case]
    over = breaker(root) or {}
    before = _snapshot(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(over.get("data_root", root)), "--out", str(out)]
    code, err = _run(argv, capsys)
    _assert_one_line(code, err, "train", expect)
    assert not out.exists()
    assert _snapshot(tmp_path / "data") == before  # no cache entry, nothing rewritten


def test_class_missing_from_train_is_only_a_warning(tmp_path, capsys, caplog):
    root = write_vtab_task(tmp_path / "data")
    _lines(root / "toy" / "train800.txt", lambda ls: [ln for ln in ls if not ln.endswith(" 2")])
    argv = ["train", *TRAIN.split(), "--method", "linear", "--epochs", "1", "--data-root", str(root)]
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err + caplog.text  # the CLI's stderr; pytest routes log records to caplog
    assert code == 0
    assert "class 2" in err and "never in train" in err


# ---------------------------------------------------------------- flags


FLAG_CASES = {
    "unknown model": ("--model no_such_vit", "unknown timm model"),
    "unknown dataset": ("--data nowhere:toy", "unknown dataset"),
    "unknown method": ("--method magic", "unknown method"),
    "unknown score": ("--score magic", "unknown score"),
    "unknown weights source": ("--weights magic", "--weights magic"),
    "budget above the adapters": ("--budget-params 10000000", "above"),
    "budget below one neuron": ("--budget-params 1", "cheapest"),
    "epochs negative": ("--epochs -1", "epochs"),
    "batch size zero": ("--batch-size 0", "batch_size"),
    "lr zero": ("--lr 0", "lr"),
    "warmup above one": ("--warmup 1.5", "warmup"),
    "rho zero": ("--rho 0", "rho"),
    "rho above one": ("--rho 1.5", "rho"),
    "image size not a multiple of the patch": ("--img-size 30", "multiple of the patch size"),
    "weights file missing": ("--weights /nonexistent/w.safetensors", "no such file"),
    "output folder not writable": ("--out /proc/mimi-run", "cannot create"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags(case, tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data")
    before = _snapshot(tmp_path / "data")
    flags, expect = FLAG_CASES[case]
    out = tmp_path / "run"
    argv = ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(root), "--out", str(out), *flags.split()]
    code, err = _run(argv, capsys)
    _assert_one_line(code, err, "train", expect)
    assert not out.exists()
    assert _snapshot(tmp_path / "data") == before


def _weights(tmp_path: Path, kind: str) -> Path:
    import timm
    import torch

    torch.manual_seed(0)
    model = "vit_tiny_patch16_224" if kind == "other" else "test_vit"
    sd = timm.create_model(model, img_size=32, num_classes=0).state_dict()
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind, expect", [("truncated", "--weights"), ("other", "does not fit")])
def test_bad_weights_file(kind, expect, tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(root), "--out", str(out)]
    code, err = _run([*argv, "--weights", str(_weights(tmp_path, kind))], capsys)
    _assert_one_line(code, err, "train", expect)
    assert not out.exists()


def test_yaml_config_unknown_keys_and_wrong_types(tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data")
    for text, expect in [("epochs: 1\nlearning_rate: 0.1\n", "unknown keys"), ("epochs: ten\n", "epochs")]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        argv = ["train", "--config", str(cfg), *TRAIN.split(), "--data-root", str(root), "--out", str(tmp_path / "r")]
        code, err = _run(argv, capsys)
        _assert_one_line(code, err, "train", expect)
        assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- runs and files that exist


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input_run")
    root = write_vtab_task(base / "data")
    out = base / "run"
    argv = ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(root), "--out", str(out)]
    assert main(argv) == 0
    return root, out


def _adapter_file(tmp_path: Path, run: Path, kind: str) -> Path:
    """A broken task file: truncated, from another backbone, or with mismatched shapes."""
    from safetensors.torch import load_file

    from mimi.core.taskfile import read_metadata

    src = run / "adapters.safetensors"
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        path.write_bytes(src.read_bytes()[: src.stat().st_size - 100])
        return path
    meta, tensors = read_metadata(src), load_file(str(src))
    if kind == "other backbone":
        meta["architecture"] = "swin_tiny_patch4_window7_224"
        meta["model"] = "swin_tiny_patch4_window7_224"
    else:  # mismatched shapes: every adapter twice as wide as its metadata says
        tensors = {k: (v.repeat(2, 1) if k.endswith("down.weight") else v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["truncated", "other backbone", "mismatched shapes"])
@pytest.mark.parametrize("command", ["eval", "info", "export", "predict"])
def test_bad_adapter_files(command, kind, run_dir, tmp_path, capsys):
    import shutil

    root, run = run_dir
    bad = _adapter_file(tmp_path, run, kind)
    target = tmp_path / "out"
    if command in ("eval", "export"):  # these read a file of a run folder: put the bad file in a copy of the run
        copy = tmp_path / "runcopy"
        shutil.copytree(run, copy)
        shutil.copy(bad, copy / "adapters.safetensors")
    argv = {
        "eval": ["eval", str(tmp_path / "runcopy")],
        "info": ["info", str(bad)],
        "export": ["export", str(tmp_path / "runcopy"), "--out", str(target / "t.safetensors")],
        "predict": [
            "predict", "--backbone", "test_vit", "--img-size", "32", "--weights", "none", "--task", f"t={bad}",
            "--images", str(root / "toy" / "images"), "--out", str(target / "p.jsonl"), "--no-progress",
        ],
    }[command]  # fmt: skip
    code, err = _run(argv, capsys)
    if command == "info" and kind != "truncated":
        return  # info only reads the file: shapes and architecture are only wrong against a backbone
    _assert_one_line(
        code, err, command, {"truncated": "safetensors", "other backbone": "swin", "mismatched shapes": "shape"}[kind]
    )
    assert not target.exists()


def test_bad_adapter_files_in_the_bank(run_dir, tmp_path):
    import mimi
    from mimi.trainer import load_run

    _, run = run_dir
    model = load_run(run).model
    bank = mimi.AdapterBank("test_vit", weights="none", img_size=32, device="cpu")
    bank.add("good", run / "adapters.safetensors")
    for kind in ("truncated", "other backbone", "mismatched shapes"):
        with pytest.raises(mimi.CheckpointError):
            bank.add(kind, _adapter_file(tmp_path, run, kind))
    assert bank.tasks == ["good"] and model is not None


def test_output_folder_holding_another_run(run_dir, tmp_path, capsys):
    root, run = run_dir
    before = _snapshot(run)
    argv = ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(root), "--out", str(run)]
    code, err = _run(argv, capsys)
    _assert_one_line(code, err, "train", "already holds a run")
    assert _snapshot(run) == before


def test_resume_not_a_run_or_edited_config(run_dir, tmp_path, capsys):
    import shutil

    _, run = run_dir
    code, err = _run(["train", "--resume", str(tmp_path)], capsys)
    _assert_one_line(code, err, "train", "no resumable run")
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    _lines(edited / "config.yaml", lambda ls: [ln.replace("lr: 0.001", "lr: 0.5") for ln in ls])
    before = _snapshot(edited)
    code, err = _run(["train", "--resume", str(edited)], capsys)
    _assert_one_line(code, err, "train", "config.yaml was edited")
    assert _snapshot(edited) == before


def test_bench_spec_unknown_keys_and_methods(tmp_path, capsys):
    for extra, expect in [("colour: red\n", "unknown bench spec keys"), ("", "unknown method")]:
        spec = tmp_path / "s.yaml"
        method = "magic" if not extra else "linear"
        spec.write_text(
            f"name: x\nresults: {tmp_path / 'res'}\nruns: {tmp_path / 'runs'}\n{extra}"
            f"groups: {{g: [vtab1k:toy]}}\nmethods: [{{label: m, method: {method}}}]\n"
        )
        code, err = _run(["bench", str(spec)], capsys)
        _assert_one_line(code, err, "bench", expect)
        assert not (tmp_path / "res").exists() and not (tmp_path / "runs").exists()


def test_report_on_a_folder_without_results(tmp_path, capsys):
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    code, err = _run(["report", str(tmp_path)], capsys)
    _assert_one_line(code, err, "report", "no result")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]
    code, err = _run(["report", str(tmp_path / "missing")], capsys)
    _assert_one_line(code, err, "report", "no such folder")
