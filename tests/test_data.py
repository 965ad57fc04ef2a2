"""Dataset loaders on tiny folders written here, in each source's real on-disk layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimi.core.errors import DataError
from mimi.data import (
    DATASETS,
    InMemoryDataset,
    LazyImageDataset,
    build_task,
    list_datasets,
    stratified_split,
)

IMG = 16  # output side used by most tests


def write_image(path: Path, color, mode: str = "RGB", size: tuple[int, int] = (20, 12)) -> None:
    """A constant image (PNG is lossless, so its pixels are known exactly after decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def uid_color(i: int) -> tuple[int, int, int]:
    """A colour that identifies image ``i`` after decoding (the red channel carries the id)."""
    return (i, 255 - i, 7)


def ids(ds: InMemoryDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].tolist()


def write_vtab(root: Path, task: str, counts=None, n_classes: int = 3) -> Path:
    """A VTAB-1k task folder: images under images/, one list file per split (one path with a space)."""
    counts = counts or {"train800": 4, "val200": 2, "train800val200": None, "test": 3}
    task_dir = root / task
    lines: dict[str, list[str]] = {}
    i = 0
    for split, per_class in counts.items():
        if per_class is None:
            continue
        lines[split] = []
        for y in range(n_classes):
            for _ in range(per_class):
                rel = f"images/{split}/img {i}.png"  # a space in the name: the label is the last token
                write_image(task_dir / rel, uid_color(i))
                lines[split].append(f"{rel} {y}")
                i += 1
    if "train800val200" in counts:
        lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (task_dir / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    return task_dir


# ---------------------------------------------------------------- vtab1k


def test_vtab1k_splits_shapes_and_alias(tmp_path):
    write_vtab(tmp_path, "cifar")
    task = build_task("vtab1k:cifar100", root=tmp_path, img_size=IMG)  # alias -> cifar
    assert task.name == "vtab1k:cifar"
    assert task.num_classes == 3 and task.classes is None
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 9)
    x, y = task.train[0]
    assert x.shape == (3, IMG, IMG) and x.dtype == torch.float32 and isinstance(y, int)
    assert isinstance(task.train, InMemoryDataset) and task.train.images.dtype == torch.uint8
    assert task.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # The three splits hold different images.
    assert not set(ids(task.train)) & set(ids(task.val)) and not set(ids(task.train)) & set(ids(task.test))


@pytest.mark.parametrize("spec", ["vtab1k:Clevr-Count", "vtab1k:clevr_count", "vtab1k:clevr-count-all"])
def test_vtab1k_alias_spellings(tmp_path, spec):
    write_vtab(tmp_path, "clevr_count")
    assert build_task(spec, root=tmp_path, img_size=IMG).name == "vtab1k:clevr_count"


def test_vtab1k_unknown_task_folder_is_accepted(tmp_path):
    write_vtab(tmp_path, "elpv_defect", n_classes=2)
    task = build_task("vtab1k:elpv_defect", root=tmp_path, img_size=IMG)
    assert task.name == "vtab1k:elpv_defect" and task.num_classes == 2


def test_vtab1k_trainval(tmp_path):
    write_vtab(tmp_path, "dtd")
    plain = build_task("vtab1k:dtd", root=tmp_path, img_size=IMG)
    both = build_task("vtab1k:dtd", root=tmp_path, img_size=IMG, trainval=True)
    assert len(both.train) == len(plain.train) + len(plain.val)
    assert sorted(ids(both.train)) == sorted(ids(plain.train) + ids(plain.val))
    assert ids(both.val) == ids(plain.val)  # kept, but no longer held out


def test_vtab1k_trainval_without_its_list_file(tmp_path):
    write_vtab(tmp_path, "dtd", counts={"train800": 2, "val200": 1, "test": 1})
    both = build_task("vtab1k:dtd", root=tmp_path, img_size=IMG, trainval=True)
    assert len(both.train) == 9


def test_normalisation_of_a_constant_image(tmp_path):
    color, mean, std = (200, 10, 128), (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    task_dir = tmp_path / "const"
    for split in ("train800", "val200", "test"):
        write_image(task_dir / f"{split}.png", color, size=(37, 23))  # resized up and down, not square
        (task_dir / f"{split}.txt").write_text(f"{split}.png 0\n")
    task = build_task("vtab1k:const", root=tmp_path, img_size=IMG, mean=mean, std=std)
    for in_memory in (True, False):
        ds = build_task("vtab1k:const", root=tmp_path, img_size=IMG, mean=mean, std=std, in_memory=in_memory).test
        x, _ = ds[0]
        want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, mean, std)]).view(3, 1, 1).expand(3, IMG, IMG)
        torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    assert task.num_classes == 1


@pytest.mark.parametrize("mode,color", [("L", 100), ("RGBA", (100, 100, 100, 30)), ("LA", (100, 255))])
def test_grayscale_and_alpha_become_rgb(tmp_path, mode, color):
    task_dir = tmp_path / "gray"
    for split in ("train800", "val200", "test"):
        write_image(task_dir / f"{split}.png", color, mode=mode)
        (task_dir / f"{split}.txt").write_text(f"{split}.png 0\n")
    task = build_task("vtab1k:gray", root=tmp_path, img_size=IMG)
    assert task.train.images.shape == (1, 3, IMG, IMG)
    assert (task.train.images == 100).all()


def test_jpeg_and_lazy_match_in_memory(tmp_path):
    task_dir = write_vtab(tmp_path, "svhn", counts={"train800": 2, "val200": 1, "test": 1}, n_classes=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(task_dir / "t.jpg")
    (task_dir / "test.txt").write_text("t.jpg 1\n")
    eager = build_task("vtab1k:svhn", root=tmp_path, img_size=IMG)
    lazy = build_task("vtab1k:svhn", root=tmp_path, img_size=IMG, in_memory=False)
    assert isinstance(lazy.test, LazyImageDataset) and isinstance(eager.test, InMemoryDataset)
    for a, b in zip(eager.train, lazy.train):
        torch.testing.assert_close(a[0], b[0])
        assert a[1] == b[1]
    torch.testing.assert_close(eager.test[0][0], lazy.test[0][0])
    # The engine's fast path: normalising a uint8 batch equals item-by-item access.
    torch.testing.assert_close(
        eager.train.normalize(eager.train.images[:3]), torch.stack([eager.train[i][0] for i in range(3)])
    )


def test_classes_txt(tmp_path):
    task_dir = write_vtab(tmp_path, "eurosat", n_classes=2)
    (task_dir / "classes.txt").write_text("forest\nriver\nsea\n")
    task = build_task("vtab1k:eurosat", root=tmp_path, img_size=IMG)
    assert task.num_classes == 3 and task.classes == ["forest", "river", "sea"]


def test_cache_roundtrip(tmp_path):
    task_dir = write_vtab(tmp_path, "kitti")
    first = build_task("vtab1k:kitti", root=tmp_path, img_size=IMG, cache=True)
    files = sorted((task_dir / ".cache").glob("*.npy"))
    assert len(files) == 3  # train, val, test
    for f in files:
        np.load(f, allow_pickle=False)  # plain arrays, no pickle
    second = build_task("vtab1k:kitti", root=tmp_path, img_size=IMG, cache=True)
    assert torch.equal(first.test.images, second.test.images)
    write_image(task_dir / "images/test/img 18.png", (1, 2, 3), size=(21, 12))  # a changed file: new key
    third = build_task("vtab1k:kitti", root=tmp_path, img_size=IMG, cache=True)
    assert len(list((task_dir / ".cache").glob("*.npy"))) == 4 and third.test.images[0, 0, 0, 0] == 1


# ---------------------------------------------------------------- errors


def _error(spec: str, **kw) -> str:
    with pytest.raises(DataError) as e:
        build_task(spec, img_size=IMG, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_vtab1k_errors(tmp_path):
    task_dir = write_vtab(tmp_path, "dtd")
    assert "--data-root" in _error("vtab1k:dtd")
    assert "does not exist" in _error("vtab1k:dtd", root=tmp_path / "nope")
    msg = _error("vtab1k:foo", root=tmp_path)
    assert str(tmp_path / "foo") in msg and "--data-root" in msg
    assert "vtab1k:TASK" in _error("vtab1k", root=tmp_path)
    (task_dir / "val200.txt").unlink()
    assert "val200.txt" in _error("vtab1k:dtd", root=tmp_path)
    write_vtab(tmp_path, "dtd")
    (task_dir / "images/test/img 18.png").unlink()
    assert "img 18.png does not exist" in _error("vtab1k:dtd", root=tmp_path)
    write_vtab(tmp_path, "dtd")
    (task_dir / "test.txt").write_text("images/test/img 18.png 0\nimages/test/img 19.png cat\n")
    msg = _error("vtab1k:dtd", root=tmp_path)
    assert "test.txt:2" in msg and "integer label" in msg
    (task_dir / "images/test/img 18.png").write_bytes(b"not an image")
    (task_dir / "test.txt").write_text("images/test/img 18.png 0\n")
    assert "img 18.png" in _error("vtab1k:dtd", root=tmp_path)
    (task_dir / "test.txt").write_text("lonely_path.png\n")
    assert "test.txt:1" in _error("vtab1k:dtd", root=tmp_path)


def test_unknown_prefix():
    msg = _error("imagenet:val")
    assert "unknown dataset" in msg and "vtab1k" in msg and "domainnet" in msg


def test_registry_lists_every_source():
    assert {"vtab1k", "domainnet", "folder", "cifar10", "cifar100", "svhn", "flowers102"} <= set(DATASETS)
    lines = list_datasets()
    assert len(lines) == len(DATASETS) and any(line.startswith("vtab1k:TASK") for line in lines)


# ---------------------------------------------------------------- stratified split and DomainNet


def test_stratified_split():
    labels = [0] * 10 + [1] * 5 + [2]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    assert [labels[i] for i in val].count(0) == 2 and [labels[i] for i in val].count(1) == 1
    assert 15 in train  # a class with one image stays in train
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.2, seed=1) != (train, val)


def write_domainnet(
    root: Path, domain: str = "clipart", n_classes: int = 3, n_train: int = 10, n_test: int = 2
) -> None:
    i = 0
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for y in range(n_classes):
            for k in range(n):
                rel = f"{domain}/class_{y}/{split}_{k}.png"
                write_image(root / rel, uid_color(i))
                lines.append(f"{rel} {y}")
                i += 1
        (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_stratified_val(tmp_path):
    write_domainnet(tmp_path)
    task = build_task("domainnet:clipart", root=tmp_path, img_size=IMG, val_fraction=0.2, seed=3)
    assert task.name == "domainnet:clipart" and task.num_classes == 345
    assert (len(task.train), len(task.val), len(task.test)) == (24, 6, 6)
    assert not set(ids(task.train)) & set(ids(task.val))
    assert set(ids(task.train)) | set(ids(task.val)) == set(range(30))
    assert sorted(task.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # Labels travel with their images.
    assert all(y == i // 10 for i, y in zip(ids(task.train), task.train.labels.tolist()))
    again = build_task("domainnet:clipart", root=tmp_path, img_size=IMG, val_fraction=0.2, seed=3)
    other = build_task("domainnet:clipart", root=tmp_path, img_size=IMG, val_fraction=0.2, seed=4)
    assert ids(again.val) == ids(task.val) and ids(other.val) != ids(task.val)
    both = build_task("domainnet:clipart", root=tmp_path, img_size=IMG, val_fraction=0.2, seed=3, trainval=True)
    assert len(both.train) == 30 and ids(both.val) == ids(task.val)


def test_domainnet_errors(tmp_path):
    write_domainnet(tmp_path)
    assert "domains:" in _error("domainnet:photos", root=tmp_path)
    assert "real_train.txt" in _error("domainnet:real", root=tmp_path)
    assert "--data-root" in _error("domainnet:clipart")


# ---------------------------------------------------------------- folder


def write_folder(base: Path, splits=("train", "val", "test"), classes=("dog", "cat", "bird"), n: int = 3) -> None:
    for split in splits:
        for cls in classes:
            for k in range(n):
                write_image(base / split / cls / f"{k}.png", (10, 20, 30))


def test_folder_with_val(tmp_path):
    write_folder(tmp_path / "pets")
    task = build_task("folder:pets", root=tmp_path, img_size=IMG)  # relative to root
    assert task.classes == ["bird", "cat", "dog"] and task.num_classes == 3
    assert (len(task.train), len(task.val), len(task.test)) == (9, 9, 9)
    assert task.test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert len(build_task(f"folder:{tmp_path / 'pets'}", img_size=IMG, trainval=True).train) == 18


def test_folder_without_val(tmp_path):
    write_folder(tmp_path, splits=("train", "test"), n=5)
    task = build_task(f"folder:{tmp_path}", img_size=IMG, val_fraction=0.2)
    assert (len(task.train), len(task.val), len(task.test)) == (12, 3, 15)
    assert sorted(task.val.labels.tolist()) == [0, 1, 2]


def test_folder_errors(tmp_path):
    assert "no such folder" in _error(f"folder:{tmp_path / 'nope'}")
    write_folder(tmp_path, splits=("train",))
    assert "test/" in _error(f"folder:{tmp_path}")
    write_folder(tmp_path, splits=("test",), classes=("dog", "cow"))
    assert "cow" in _error(f"folder:{tmp_path}")


# ---------------------------------------------------------------- torchvision sets


def write_fake_cifar10(root: Path, n: int = 6) -> None:
    """CIFAR-10's on-disk format: pickled dicts of uint8 rows (R plane, G plane, B plane) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    i = 0
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for row in range(n):
            data[row] = np.array(uid_color(i), dtype=np.uint8).reshape(3, 1, 1)
            i += 1
        batch = {"data": data.reshape(n, 3072), "labels": [r % 3 for r in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


@pytest.fixture
def offline_torchvision(monkeypatch):
    """No downloads, and file checks by existence only (the fake files cannot match the real md5 sums)."""
    import torchvision.datasets as tvd
    import torchvision.datasets.flowers102 as tv_flowers

    import mimi.data.cifar

    def no_network(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd.Flowers102, "download", no_network)
    monkeypatch.setattr(mimi.data.cifar, "download", lambda layout, root: no_network(None))
    exists = lambda path, md5=None: Path(path).is_file()  # noqa: E731
    monkeypatch.setattr(tv_flowers, "check_integrity", exists)


def test_cifar10_through_torchvision(tmp_path, offline_torchvision):
    write_fake_cifar10(tmp_path)
    task = build_task("cifar10", root=tmp_path, img_size=IMG, val_fraction=0.2)
    assert task.name == "cifar10" and task.num_classes == 10 and task.classes[:2] == ["airplane", "automobile"]
    assert len(task.train) + len(task.val) == 30 and len(task.test) == 6
    assert sorted(task.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(ids(task.train)) & set(ids(task.val))
    assert ids(task.test) == list(range(30, 36))  # pixels decoded from the planar rows, in order
    assert task.train.images[0, :, 0, 0].tolist() == list(uid_color(ids(task.train)[0]))
    lazy = build_task("cifar10", root=tmp_path, img_size=IMG, val_fraction=0.2, in_memory=False)
    torch.testing.assert_close(lazy.test[2][0], task.test[2][0])


class _RunsCode:
    """What a hostile batch file carries: unpickling it with pickle.load would call os.mkdir."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_cifar_batches_are_read_without_running_code(tmp_path, offline_torchvision):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "was_run"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}))
    msg = _error("cifar10", root=tmp_path)
    assert str(batch) in msg and "refers to" in msg and "mkdir" in msg
    assert not marker.exists()  # refused before anything was called
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}))
    assert "N x 3072 uint8" in _error("cifar10", root=tmp_path)
    batch.write_bytes(b"not a pickle")
    assert "not a CIFAR batch file" in _error("cifar10", root=tmp_path)


def test_cifar100_python2_style_byte_keys(tmp_path, offline_torchvision):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 10), ("test", 4)):
        data = np.arange(n * 3072, dtype=np.int64).astype(np.uint8).reshape(n, 3072)
        batch = {b"data": data, b"fine_labels": [k % 5 for k in range(n)], b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"c{k}" for k in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    task = build_task("cifar100", root=tmp_path, img_size=IMG, val_fraction=0.2)
    assert task.num_classes == 100 and task.classes[:2] == ["c0", "c1"] and len(task.test) == 4
    assert sorted(task.test.labels.tolist()) == [0, 1, 2, 3]


def test_cifar10_missing_files(tmp_path, offline_torchvision):
    msg = _error("cifar10", root=tmp_path)
    assert f"files not found under {tmp_path}" in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "--data-root" in _error("cifar10")
    assert "takes no argument" in _error("cifar10:train", root=tmp_path)


def test_flowers102_own_val_split(tmp_path, offline_torchvision):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    labels = [1, 2, 1, 2, 1, 2, 1, 2]  # 1-based, as in imagelabels.mat
    for k in range(1, len(labels) + 1):
        write_image(base / "jpg" / f"image_{k:05d}.jpg", (k * 20, 0, 0))
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {"trnid": np.array([1, 2, 3]), "valid": np.array([4, 5]), "tstid": np.array([6, 7, 8])})
    task = build_task("flowers102", root=tmp_path, img_size=IMG)
    assert (len(task.train), len(task.val), len(task.test)) == (3, 2, 3) and task.num_classes == 102
    assert task.val.labels.tolist() == [1, 0]
    assert len(build_task("flowers102", root=tmp_path, img_size=IMG, trainval=True).train) == 5
