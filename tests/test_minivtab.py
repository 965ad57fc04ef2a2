"""MiniVTAB builder: split invariants, determinism, reuse of finished builds, and labels the images support.

Digits and ELPV always run. The structured tasks always run on a small synthetic Fashion-MNIST written in
the idx format (so their label checks never depend on the Debian package); the real Fashion-MNIST build is
checked too where ``find_fashion_mnist`` finds the files.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimi.core.errors import ConfigError, DataError
from mimi.data.build import minivtab as mv

pytest.importorskip("elpv_dataset")
pytest.importorskip("sklearn")

TEST_SIZE = 120
ELPV_SIZE = 32
SPLITS = ("train800", "val200", "test")


# ------------------------------------------------------------------------------------------------ helpers


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _synthetic_items(n: int, rng: np.random.Generator) -> np.ndarray:
    """Asymmetric blobs (a textured rectangle plus a bright off-centre square), so rotations are distinguishable."""
    items = np.zeros((n, 28, 28), np.uint8)
    for k in range(n):
        h, w = rng.integers(8, 27, size=2)
        y, x = rng.integers(0, 28 - h + 1), rng.integers(0, 28 - w + 1)
        items[k, y : y + h, x : x + w] = rng.integers(60, 160, size=(h, w))
        items[k, y : y + 5, x : x + 5] = 255
    return items


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST in torchvision's layout, train gzipped and t10k raw (both must be readable)."""
    base = tmp_path_factory.mktemp("fakefm")
    raw = base / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n, compress in (("train", 1600, True), ("t10k", 900, False)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _synthetic_items(n, rng), compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return base


def _read_split(folder: Path, split: str) -> list[tuple[str, int]]:
    rows = []
    for line in (folder / f"{split}.txt").read_text().splitlines():
        rel, label = line.split()
        rows.append((rel, int(label)))
    return rows


def _load(folder: Path, rel: str) -> np.ndarray:
    with Image.open(folder / rel) as im:
        return np.asarray(im.convert("L"))


def _flat(index: list) -> set[int]:
    return {j for i in index for j in (i if isinstance(i, list) else [i])}


def check_invariants(folder: Path, test_size: int) -> dict:
    """Everything a VTAB-1k-layout task folder must satisfy, whatever the task."""
    info = json.loads((folder / "minivtab.json").read_text())
    spec = mv.TASKS[folder.name]
    assert info["complete"] and info["task"] == spec.name and info["spec"]["num_classes"] == spec.num_classes
    rows = {s: _read_split(folder, s) for s in (*SPLITS, "train800val200")}
    assert len(rows["train800"]) == 800 and len(rows["val200"]) == 200
    assert rows["train800val200"] == rows["train800"] + rows["val200"]
    assert 1 <= len(rows["test"]) <= test_size
    assert {s: len(r) for s, r in rows.items()} == info["counts"]
    # Every line points at an existing PNG under its split's folder, and no PNG is unlisted.
    listed = {rel for s in SPLITS for rel, _ in rows[s]}
    assert len(listed) == sum(len(rows[s]) for s in SPLITS)
    assert all(rel.startswith(f"images/{s}/") for s in SPLITS for rel, _ in rows[s])
    on_disk = {str(p.relative_to(folder)) for p in (folder / "images").rglob("*.png")}
    assert on_disk == listed
    for s in SPLITS:
        labels = np.array([lab for _, lab in rows[s]])
        assert labels.min() >= 0 and labels.max() < spec.num_classes
        assert np.bincount(labels, minlength=spec.num_classes).tolist() == info["class_histogram"][s]
        assert len(info["sources"][s]["index"]) == len(rows[s])
    assert set(np.array([lab for _, lab in rows["train800"]])) == set(range(spec.num_classes))
    names = (folder / "classes.txt").read_text().splitlines()  # one distinct name per class, for task files
    assert len(names) == len(set(names)) == spec.num_classes
    # No source image is shared between train, val and test (same source set: indices must be disjoint).
    src = info["sources"]
    tr, va, te = (_flat(src[s]["index"]) for s in SPLITS)
    assert not tr & va
    if src["test"]["set"] == src["train800"]["set"]:
        assert not (tr | va) & te
    else:
        assert "t10k" in src["test"]["set"] and "train" in src["train800"]["set"]
    return info


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory, fake_fmnist) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("minivtab")
    tasks = ["digits", "specialized", "fmnist_location", "fmnist_orientation", "fmnist_count"]
    info = mv.build_minivtab(
        root, tasks=tasks, seed=3, test_size=TEST_SIZE, fmnist_dir=fake_fmnist, elpv_size=ELPV_SIZE, progress=False
    )
    return root, info


# ------------------------------------------------------------------------------------------------- tests


def test_registry_and_groups():
    assert len(mv.TASKS) == 7
    assert sorted(t for ts in mv.GROUPS.values() for t in ts) == sorted(mv.TASKS)
    assert mv.GROUPS["natural"] == ["fashion_mnist", "digits"]
    assert mv.GROUPS["specialized"] == ["elpv_defect", "elpv_type"]
    assert {mv.TASKS[t].num_classes for t in ("elpv_defect", "elpv_type", "fmnist_count")} == {4, 2, 6}


def test_invariants_all_built_tasks(built):
    root, info = built
    assert set(info) == {"digits", "elpv_defect", "elpv_type", "fmnist_location", "fmnist_orientation", "fmnist_count"}
    for task in info:
        check_invariants(root / task, TEST_SIZE)
        assert info[task]["skipped"] is False
    # The synthetic t10k has 900 items and test_size is 120: every task gets the full requested test set.
    assert all(i["counts"]["test"] == TEST_SIZE for i in info.values())
    assert not list(root.glob(".*.tmp")) and not list(root.glob(".*.old"))


def test_test_size_capped_by_source(tmp_path):
    info = mv.build_minivtab(tmp_path, tasks=["digits"], test_size=5000, progress=False)["digits"]
    # 1,797 digits minus the 1,000 train/val ones: the test set takes everything left, and only that.
    assert info["counts"]["test"] == 797
    check_invariants(tmp_path / "digits", 5000)


def test_digits_labels_match_source(built):
    from sklearn.datasets import load_digits

    root, info = built
    d = load_digits()
    folder = root / "digits"
    for s in SPLITS:
        rows = _read_split(folder, s)
        index = info["digits"]["sources"][s]["index"]
        assert [lab for _, lab in rows] == d.target[index].tolist()
    img = _load(folder, rows[0][0])
    assert img.shape == (32, 32) and img.max() > 200  # 0..16 mapped to 0..255 before the upscale


def test_elpv_labels_and_images_match_source(built):
    import elpv_dataset

    root, info = built
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    table = np.genfromtxt(data_dir / "labels.csv", dtype=["U19", "f8", "U4"], names=["path", "p", "type"])
    defect = np.rint(table["p"] * 3).astype(int)
    poly = (table["type"] == "poly").astype(int)
    # Both ELPV tasks use the same carve: same images, different labels.
    assert info["elpv_defect"]["sources"] == info["elpv_type"]["sources"]
    for task, truth in (("elpv_defect", defect), ("elpv_type", poly)):
        for s in SPLITS:
            rows = _read_split(root / task, s)
            index = info[task]["sources"][s]["index"]
            assert [lab for _, lab in rows] == truth[index].tolist()
    rows = _read_split(root / "elpv_defect", "test")
    for k in range(3):
        i = info["elpv_defect"]["sources"]["test"]["index"][k]
        with Image.open(data_dir / table["path"][i]) as im:
            expect = np.asarray(im.convert("L").resize((ELPV_SIZE, ELPV_SIZE), Image.BICUBIC))
        np.testing.assert_array_equal(_load(root / "elpv_defect", rows[k][0]), expect)
    # Stratified: every defect level keeps roughly its share (1508/295/106/715 of 2624) in train800.
    hist = np.array(info["elpv_defect"]["class_histogram"]["train800"])
    np.testing.assert_allclose(hist / 800, np.array([1508, 295, 106, 715]) / 2624, atol=0.01)


def _check_location(folder: Path) -> None:
    edges = 13.5 + 4.5 * np.arange(1, 8)  # 8 equal bins of the item's bounding-box centre over [13.5, 49.5]
    ys = []
    for s in SPLITS:
        for rel, label in _read_split(folder, s):
            img = _load(folder, rel)
            assert img.shape == (64, 64)
            cols, rows = np.flatnonzero(img.any(axis=0)), np.flatnonzero(img.any(axis=1))
            x_centre = (cols[0] + cols[-1]) / 2
            assert int(np.digitize(x_centre, edges)) == label, (rel, x_centre, label)
            ys.append((rows[0] + rows[-1]) / 2)
    assert np.std(ys) > 5  # y is random, not a constant that a model could ignore or exploit


def test_location_label_is_the_x_bin_of_the_item(built):
    root, _ = built
    _check_location(root / "fmnist_location")


def _render(item: np.ndarray, angle: float) -> np.ndarray:
    canvas = np.zeros((40, 40), np.uint8)
    canvas[6:34, 6:34] = item
    return np.asarray(Image.fromarray(canvas).rotate(angle, resample=Image.BILINEAR), dtype=np.float32)


def _check_orientation(folder: Path, info: dict, items: np.ndarray, n: int, min_acc: float) -> None:
    rows = _read_split(folder, "test")[:n]
    index = info["sources"]["test"]["index"]
    angles = [p["angle"] for p in info["params"]["test"]]
    hits = 0
    for k, (rel, label) in enumerate(rows):
        assert int(angles[k] // 45) == label
        img = _load(folder, rel).astype(np.float32)
        # The labelled bin must be the one whose centre angle best explains the image: a sign or offset
        # error in the label would make another bin win for most images.
        errs = [np.mean((img - _render(items[index[k]], 45 * b + 22.5)) ** 2) for b in range(8)]
        hits += int(np.argmin(errs)) == label
    assert hits / len(rows) >= min_acc, hits / len(rows)


def test_orientation_label_is_the_rotation_bin(built, fake_fmnist):
    root, info = built
    items, _ = mv.load_fashion_mnist("test", fake_fmnist)
    _check_orientation(root / "fmnist_orientation", info["fmnist_orientation"], items, TEST_SIZE, 0.9)


def _check_count(folder: Path) -> None:
    for s in SPLITS:
        for rel, label in _read_split(folder, s):
            img = _load(folder, rel)
            assert img.shape == (96, 96)
            occupied = img.reshape(3, 32, 3, 32).any(axis=(1, 3))
            assert occupied.sum() == label + 1, (rel, label)


def test_count_label_is_number_of_items(built):
    root, info = built
    _check_count(root / "fmnist_count")
    params = info["fmnist_count"]["params"]["train800"]
    labels = [lab for _, lab in _read_split(root / "fmnist_count", "train800")]
    assert [len(p["cells"]) for p in params] == [lab + 1 for lab in labels]
    assert [len(i) for i in info["fmnist_count"]["sources"]["train800"]["index"]] == [lab + 1 for lab in labels]


def test_deterministic_given_seed(built, tmp_path, fake_fmnist):
    root, _ = built
    tasks = ["digits", "elpv_type", "fmnist_count"]
    kw = dict(test_size=TEST_SIZE, fmnist_dir=fake_fmnist, elpv_size=ELPV_SIZE, progress=False)
    mv.build_minivtab(tmp_path / "same", tasks=tasks, seed=3, **kw)
    mv.build_minivtab(tmp_path / "other", tasks=["digits"], seed=4, **kw)
    for task in tasks:
        for s in (*SPLITS, "train800val200"):
            name = f"{s}.txt"
            assert (tmp_path / "same" / task / name).read_bytes() == (root / task / name).read_bytes()
        rel = _read_split(root / task, "test")[0][0]
        assert (tmp_path / "same" / task / rel).read_bytes() == (root / task / rel).read_bytes()
    assert (tmp_path / "other/digits/train800.txt").read_text() != (root / "digits/train800.txt").read_text()


def test_skip_if_complete_and_rebuild_otherwise(tmp_path):
    first = mv.build_minivtab(tmp_path, tasks=["digits"], seed=1, test_size=50, progress=False)["digits"]
    meta = tmp_path / "digits" / "minivtab.json"
    stamp = meta.stat().st_mtime_ns
    again = mv.build_minivtab(tmp_path, tasks=["digits"], seed=1, test_size=50, progress=False)["digits"]
    assert again["skipped"] and meta.stat().st_mtime_ns == stamp
    assert again["counts"] == first["counts"] and again["sources"] == first["sources"]
    # A different test_size rebuilds in place; a stale temporary folder from a crash is cleared.
    (tmp_path / ".digits.tmp" / "junk").mkdir(parents=True)
    bigger = mv.build_minivtab(tmp_path, tasks=["digits"], seed=1, test_size=60, progress=False)["digits"]
    assert not bigger["skipped"] and bigger["counts"]["test"] == 60
    assert len(list((tmp_path / "digits" / "images" / "test").iterdir())) == 60
    assert not (tmp_path / ".digits.tmp").exists()
    # An incomplete build (interrupted before minivtab.json was final) is never reused.
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "complete": False}))
    assert not mv.build_minivtab(tmp_path, tasks=["digits"], seed=1, test_size=60, progress=False)["digits"]["skipped"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown MiniVTAB task"):
        mv.build_minivtab(tmp_path, tasks=["cifar100"], progress=False)
    with pytest.raises(ConfigError):
        mv.build_minivtab(tmp_path, tasks=["digits"], test_size=0, progress=False)


def test_find_fashion_mnist(tmp_path, fake_fmnist, monkeypatch):
    assert mv.find_fashion_mnist(fake_fmnist) == fake_fmnist / "FashionMNIST" / "raw"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_fmnist / "FashionMNIST" / "raw"))
    assert mv.find_fashion_mnist() == fake_fmnist / "FashionMNIST" / "raw"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        mv.find_fashion_mnist(tmp_path)
    assert "\n" not in str(err.value) and "--fmnist-dir" in str(err.value)
    images, labels = mv.load_fashion_mnist("train", fake_fmnist)  # gzip
    assert images.shape == (1600, 28, 28) and labels[:3].tolist() == [0, 1, 2]
    assert mv.load_fashion_mnist("test", fake_fmnist)[0].shape == (900, 28, 28)  # raw
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (fake_fmnist / "FashionMNIST" / "raw").iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:-1] if f.name.startswith("t10k-images") else f.read_bytes())
    with pytest.raises(DataError, match="does not match"):
        mv.load_fashion_mnist("test", bad)


def test_real_fashion_mnist(tmp_path):
    try:
        mv.find_fashion_mnist()
    except DataError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    tasks = ["fashion_mnist", "fmnist_location", "fmnist_orientation", "fmnist_count"]
    info = mv.build_minivtab(tmp_path, tasks=tasks, test_size=300, progress=False)
    for task in tasks:
        check_invariants(tmp_path / task, 300)
        assert info[task]["counts"]["test"] == 300
    tr_img, tr_lab = mv.load_fashion_mnist("train")
    te_img, _ = mv.load_fashion_mnist("test")
    rows = _read_split(tmp_path / "fashion_mnist", "train800")
    index = info["fashion_mnist"]["sources"]["train800"]["index"]
    assert [lab for _, lab in rows] == tr_lab[index].tolist()
    np.testing.assert_array_equal(_load(tmp_path / "fashion_mnist", rows[0][0]), tr_img[index[0]])
    assert info["fashion_mnist"]["class_histogram"]["train800"] == [80] * 10
    _check_count(tmp_path / "fmnist_count")
    _check_location(tmp_path / "fmnist_location")
    # ~98% of real items match their labelled bin best; some (trousers, bags) look alike at 180 degrees,
    # hence the margin. A sign error scores ~0, an off-centre rotation ~0.5.
    _check_orientation(tmp_path / "fmnist_orientation", info["fmnist_orientation"], te_img, 200, 0.85)
