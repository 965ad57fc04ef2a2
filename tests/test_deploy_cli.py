"""`mimi export --onnx` and `mimi predict` end to end on runs the test trains on a folder it writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from vtab_fixture import write_vtab_task

from mimi.cli import main
from mimi.core.taskfile import read_metadata
from mimi.trainer import load_run

CLASSES = ["red", "green", "blue"]
COMMON = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
RUNS = {
    "mimi": "--method mimi --adapter-dim 16 --budget-params 500 --rho 0.5 --epochs 1 --first-epochs 2 --lr 3e-3",
    "lora": "--method lora --adapter-dim 2 --first-epochs 2 --epochs 2 --lr 3e-3",
    "linear": "--method linear --first-epochs 1 --epochs 1",
    "mimi-lora": "--method mimi-lora --adapter-dim 4 --budget-params 2000 --rho 0.6 --epochs 1 --first-epochs 1",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    root = write_vtab_task(base / "data")
    (root / "toy" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    torch.manual_seed(0)
    weights = base / "backbone.safetensors"  # one backbone file: training and serving load the same weights
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    out = {}
    for name, extra in RUNS.items():
        out[name] = base / name
        argv = ["train", *COMMON.split(), *extra.split(), "--weights", str(weights)]
        assert main([*argv, "--data-root", str(root), "--out", str(out[name])]) == 0
    return base, root, weights, out


def _onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]


def test_export_onnx_matches_pytorch(runs, capsys):
    base, _, _, out = runs
    x = torch.randn(5, 3, 32, 32)  # another batch size than the one traced: the batch axis is dynamic
    nodes = {}
    for name in RUNS:
        path = base / f"{name}.onnx"
        assert main(["export", str(out[name]), "--onnx", str(path), "--opset", "17"]) == 0
        assert "onnxruntime vs PyTorch" in capsys.readouterr().out
        model = load_run(out[name]).model.eval()
        with torch.no_grad():
            want = model(x).numpy()
        assert np.abs(_onnx_logits(path, x) - want).max() <= 1e-4
        nodes[name] = len(onnx.load(str(path)).graph.node)
    assert nodes["lora"] == nodes["linear"] == nodes["mimi-lora"]  # LoRA merged into the frozen weights: no extra op
    assert nodes["mimi"] > nodes["linear"]  # the adapters are real ops


def test_export_refuses_bad_requests(runs, capsys):
    base, _, _, out = runs
    assert main(["export", str(out["mimi"])]) == 2
    assert main(["export", str(out["mimi"]), "--onnx", str(base / "x.txt")]) == 2
    assert main(["export", str(out["mimi"]), "--onnx", str(base / "x.onnx"), "--opset", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("mimi export: error:") for line in err)
    assert not (base / "x.onnx").exists()


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_every_task_and_mixed(runs, tmp_path):
    _, root, weights, out = runs
    images = root / "toy" / "images"
    tasks = ["--task", f"m={out['mimi']}/adapters.safetensors", "--task", f"l={out['lora']}/adapters.safetensors"]
    serve = ["--backbone", "test_vit", "--weights", str(weights), "--img-size", "32", "--no-progress"]
    preds = tmp_path / "all.jsonl"
    assert main(["predict", *serve, *tasks, "--images", str(images), "--out", str(preds), "--topk", "2"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    files = sorted(images.glob("*.png"))
    assert len(rows) == 2 * len(files)
    assert {r["task"] for r in rows} == {"m", "l"}
    assert all(len(r["ids"]) == 2 and set(r["names"]) <= set(CLASSES) for r in rows)

    # the same predictions as each run's own model on the same images
    model = load_run(out["mimi"]).model.eval()
    from mimi.deploy import AdapterBank

    bank = AdapterBank("test_vit", weights=str(weights), img_size=32, device="cpu")
    x = bank.preprocess(files[:8])
    with torch.no_grad():
        want = model(x).softmax(-1)
    got = {r["image"]: r for r in rows if r["task"] == "m"}
    for f, p in zip(files[:8], want):
        assert got[str(f)]["ids"][0] == int(p.argmax())
        assert abs(got[str(f)]["probs"][0] - float(p.max())) < 1e-5

    # --task-of: one task per image, mixed batches; same numbers as scoring every image by every task
    mapping = tmp_path / "task_of.csv"
    chosen = {f: ("m" if i % 3 else "l") for i, f in enumerate(files)}
    mapping.write_text("image,task\n" + "".join(f"{f},{t}\n" for f, t in chosen.items()))
    mixed = tmp_path / "mixed.csv"
    argv = ["predict", *serve, *tasks, "--task-of", str(mapping), "--out", str(mixed), "--batch-size", "7"]
    assert main(argv) == 0
    table = _read_csv(mixed)
    assert len(table) == len(files)
    by_key = {(r["image"], r["task"]): r for r in rows}
    for r in table:
        ref = by_key[(r["image"], r["task"])]
        assert r["task"] == chosen[type(files[0])(r["image"])]
        assert int(r["class_id"]) == ref["ids"][0] and r["class_name"] == ref["names"][0]
        assert abs(float(r["prob"]) - ref["probs"][0]) < 1e-5


def test_predict_bad_input_one_line_nothing_written(runs, tmp_path, capsys):
    _, root, weights, out = runs
    serve = ["predict", "--backbone", "test_vit", "--weights", str(weights), "--img-size", "32", "--no-progress"]
    images = ["--images", str(root / "toy" / "images")]
    target = tmp_path / "p.jsonl"
    cases = [
        [*serve, "--task", f"m={tmp_path}/missing.safetensors", *images, "--out", str(target)],
        [*serve, "--task", f"m={out['mimi']}/adapters.safetensors", *images, "--out", str(tmp_path / "p.txt")],
        [
            *serve,
            "--task",
            f"m={out['mimi']}/adapters.safetensors",
            "--images",
            str(tmp_path / "nope"),
            "--out",
            str(target),
        ],
        [*serve, "--task", f"m={out['mimi']}/config.yaml", *images, "--out", str(target)],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mimi predict: error:"), err
    assert list(tmp_path.iterdir()) == []


def test_predict_takes_the_backbone_the_task_files_record(runs, tmp_path, capsys):
    """Without --backbone/--weights/--img-size, predict serves on the backbone, weight file and resolution the task
    files record: the same predictions as with them spelled out. Files that disagree, or record nothing, fail."""
    _, root, weights, out = runs
    tasks = ["--task", f"m={out['mimi']}/adapters.safetensors", "--task", f"r={out['mimi-lora']}/adapters.safetensors"]
    images = ["--images", str(root / "toy" / "images"), "--no-progress"]
    explicit = ["--backbone", "test_vit", "--weights", str(weights), "--img-size", "32"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["predict", *explicit, *tasks, *images, "--out", str(a)]) == 0
    capsys.readouterr()
    assert main(["predict", *tasks, *images, "--out", str(b)]) == 0
    assert f"backbone test_vit (weights {weights}, 32 px), as the task files record" in capsys.readouterr().out
    assert a.read_text() == b.read_text()

    from mimi.deploy import AdapterBank, read_task_file, recorded_backbone

    bank = AdapterBank.from_task_files({"m": out["mimi"] / "adapters.safetensors"}, device="cpu")
    assert (bank.tasks, bank.img_size, bank.weights_source) == (["m"], 32, str(weights))

    # a task file that records another backbone, and one that records none
    f = read_task_file(out["mimi"] / "adapters.safetensors")
    assert recorded_backbone([f]).model == "test_vit"
    other = tmp_path / "other.safetensors"
    tensors, meta = load_file(str(f.path)), read_metadata(f.path)
    save_file(tensors, str(other), metadata={**meta, "model": "vit_tiny_patch16_224"})
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata={k: v for k, v in meta.items() if k != "model"})
    for extra, says in (([f"o={other}"], "different backbones"), ([f"n={bare}"], "does not record its backbone")):
        argv = [
            "predict",
            *tasks,
            *sum((["--task", t] for t in extra), []),
            *images,
            "--out",
            str(tmp_path / "c.jsonl"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "c.jsonl").exists()
