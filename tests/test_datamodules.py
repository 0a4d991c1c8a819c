"""Every dataset format, loaded from real shared faces laid out in that format's own files."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import loadmat, savemat

import datamodules
from ppfr.align import Aligner
from ppfr.config import groups, load_option
from ppfr.errors import ConfigError, DataError


def lfw_photo(faces_mini: Path, name: str, n: int) -> Path:
    return faces_mini / "lfw" / name / f"{name}_{n:04d}.jpg"


def copy_lfw(faces_mini: Path, root: Path, people: dict[str, list[int]]) -> Path:
    """An LFW-layout folder holding copies of the named real photos."""
    for name, numbers in people.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            shutil.copy(lfw_photo(faces_mini, name, n), root / name)
    return root


def make(name: str, root: Path, cache: Path, **kwargs) -> datamodules.FaceDataModule:
    return datamodules.create({"name": name, "root": str(root), "cache_dir": str(cache), **kwargs})


# -- LFW ------------------------------------------------------------------------------------------
def test_lfw_full_index_counts(faces_mini, align_cache):
    records, pairs = make("lfw", faces_mini / "lfw", align_cache).index()
    assert len(records) == 1798
    assert len({r.identity for r in records}) == 844
    assert len(pairs) == 1200 and sum(p.issame for p in pairs) == 600
    assert sorted({p.fold for p in pairs}) == [0, 1]
    first = pairs[0]
    assert (records[first.i].id, records[first.j].id, first.issame) == (
        "Abel_Pacheco/Abel_Pacheco_0001.jpg",
        "Abel_Pacheco/Abel_Pacheco_0004.jpg",
        True,
    )


def test_lfw_pair_subset_aligns_only_what_the_pairs_need(faces_mini, align_cache):
    dm = make("lfw", faces_mini / "lfw", align_cache, subset={"pairs": 8}, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert dm.pairs.shape == (8, 2) and dm.issame.tolist() == [True] * 4 + [False] * 4
    assert dm.folds.tolist() == [0] * 8
    ids = dm.dataset.ids
    assert len(ids) == 13 and "Abel_Pacheco/Abel_Pacheco_0004.jpg" in ids
    # Genuine pairs share a label, impostor pairs do not.
    labels = torch.tensor(dm.dataset.labels)
    same = labels[dm.pairs[:, 0]] == labels[dm.pairs[:, 1]]
    assert torch.equal(same, dm.issame)
    item = dm.dataset[int(dm.pairs[0, 0])]
    assert item["image"].shape == (3, 112, 112) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1 and item["image"].std() > 0.05
    report = dm.report
    assert report["images"] == 13 and report["pairs"] == 8 and report["detected"] == 13
    assert report["cache_hits"] + report["cache_misses"] == 13


def test_lfw_fold_subset_keeps_other_people(faces_mini, align_cache):
    """`subset.folds` picks pairs from a later fold: faces, and people, that fold 1 never showed."""
    first, _ = make("lfw", faces_mini / "lfw", align_cache, subset={"pairs": 40}).index()
    records, pairs = make("lfw", faces_mini / "lfw", align_cache, subset={"folds": [2], "pairs": 40}).index()
    assert len(pairs) == 40 and {p.fold for p in pairs} == {1} and sum(p.issame for p in pairs) == 20
    assert not {r.identity for r in records} & {r.identity for r in first}
    _, both = make("lfw", faces_mini / "lfw", align_cache, subset={"folds": [2, 1]}).index()
    assert len(both) == 1200
    with pytest.raises(
        ConfigError, match=r"subset\.folds: .*lfw has no pairs in fold\(s\) \[3\]; its folds: \[1, 2\]"
    ):
        make("lfw", faces_mini / "lfw", align_cache, subset={"folds": [3]}).index()
    for bad in (2, [], [0]):
        with pytest.raises(
            ConfigError, match=r"data\.subset\.folds: .* must be a non-empty list of fold numbers"
        ):
            make("lfw", faces_mini / "lfw", align_cache, subset={"folds": bad})


def test_lfw_identity_subset_and_png_folders(faces_mini, align_cache):
    dm = make("lfw", faces_mini / "bbt", align_cache, subset={"identities": 2})
    dm.setup()  # without prepare_data: setup aligns what is missing
    assert dm.label_names == ["amy", "bernadette"]
    assert len(dm.dataset) == 10 and sorted(set(dm.dataset.labels)) == [0, 1]
    # bbt's pairs among the two identities remain, renumbered into the dataset.
    assert len(dm.pairs) > 0 and int(dm.pairs.max()) < 10
    assert dm.dataset[0]["image"].shape == (3, 112, 112)


def test_lfw_folder_without_pairs(faces_mini, align_cache, tmp_path):
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1, 4]})
    with pytest.raises(DataError, match=r"pairs\.txt: pairs file not found .*pairs_file: null"):
        make("lfw", root, align_cache).index()
    dm = make("lfw", root, align_cache, pairs_file=None)
    dm.setup()
    assert len(dm.dataset) == 2 and dm.pairs.shape == (0, 2) and len(dm.issame) == 0


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ["1\t1", "Abel_Pacheco\t1\t9", "Abel_Pacheco\t1\tAkhmed_Zakayev\t1"],
            r"line 2: image Abel_Pacheco/Abel_Pacheco_0009",
        ),
        (["1\t1", "Abel_Pacheco\t1", "Abel_Pacheco\t1\tAkhmed_Zakayev\t1"], r"line 2: expected 'name i j'"),
        (["one\ttwo"], r"line 1: bad header"),
        (
            ["2\t1", "Abel_Pacheco\t1\t4", "Abel_Pacheco\t1\tAkhmed_Zakayev\t1"],
            r"4 pairs, but the file lists 2",
        ),
    ],
)
def test_bad_pairs_file(faces_mini, align_cache, tmp_path, lines, message):
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1, 4], "Akhmed_Zakayev": [1]})
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as err:
        make("lfw", root, align_cache).index()
    assert str(root / "pairs.txt") in str(err.value)


def test_missing_root_and_bad_config(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: dataset root not found"):
        datamodules.create({"name": "lfw", "root": str(tmp_path / "nowhere")}).index()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batchsize'\].*valid keys: .*'batch_size'"):
        datamodules.create({"name": "lfw", "root": str(tmp_path), "batchsize": 8})
    with pytest.raises(ConfigError, match=r"data\.name: unknown dataset 'lfw2'; known: agedb, bin"):
        datamodules.create({"name": "lfw2", "root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.subset: unknown key\(s\) \['people'\]"):
        datamodules.create({"name": "lfw", "root": str(tmp_path), "subset": {"people": 3}})
    with pytest.raises(ConfigError, match=r"data\.augment: unknown key\(s\) \['blur'\]"):
        datamodules.create({"name": "lfw", "root": str(tmp_path), "augment": {"blur": 0.5}})
    with pytest.raises(ConfigError, match=r"on_no_face: 'drop'"):
        datamodules.create({"name": "lfw", "root": str(tmp_path), "on_no_face": "drop"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        datamodules.create({"name": "lfw", "root": str(tmp_path / "empty"), "pairs_file": None}).index()


def test_truncated_image_in_dataset(faces_mini, align_cache, tmp_path):
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1]})
    data = lfw_photo(faces_mini, "Abel_Pacheco", 4).read_bytes()
    (root / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg").write_bytes(data[:3000])
    with pytest.raises(DataError, match=r"Abel_Pacheco_0004\.jpg: cannot decode image"):
        make("lfw", root, align_cache, pairs_file=None).setup()


def test_every_unreadable_image_is_named_up_to_a_cap(faces_mini, align_cache, tmp_path):
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1]})
    data = lfw_photo(faces_mini, "Abel_Pacheco", 4).read_bytes()
    (root / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg").write_bytes(data[:3000])
    (root / "Zed").mkdir()
    (root / "Zed" / "Zed_0001.jpg").write_text("not a picture")
    (root / "Zed" / "Zed_0002.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        make("lfw", root, align_cache, pairs_file=None).setup()
    message = str(err.value)
    assert message.startswith(f"{root}: 3 unreadable image(s): ") and "\n" not in message
    for name in ("Abel_Pacheco_0004.jpg: cannot decode", "Zed_0001.jpg: not a readable", "Zed_0002.png"):
        assert name in message
    for k in range(3, 13):  # 13 bad files in all: 10 named, the rest counted
        (root / "Zed" / f"Zed_{k:04d}.jpg").write_text("not a picture")
    with pytest.raises(DataError, match=r": 13 unreadable image\(s\): .*; and 3 more$") as err:
        make("lfw", root, align_cache, pairs_file=None).setup()
    assert str(err.value).count("not a readable image") + str(err.value).count("cannot decode") == 10


def test_tasks_get_loaders_and_pairs_without_setup(faces_mini, align_cache):
    dm = make("lfw", faces_mini / "lfw", align_cache, subset={"pairs": 8}, batch_size=4)
    assert dm.pairs.shape == (8, 2)  # first use aligns and sets up
    batches = list(dm.predict_dataloader(batch_size=5))
    assert [len(b["index"]) for b in batches] == [5, 5, 3]
    chosen = [int(dm.pairs[0, 1]), int(dm.pairs[0, 0]), int(dm.pairs[5, 0])]
    (batch,) = dm.predict_dataloader(indices=chosen, batch_size=8)
    assert batch["index"].tolist() == chosen and list(batch["id"]) == [dm.dataset.ids[i] for i in chosen]
    assert torch.equal(batch["image"][0], dm.dataset[chosen[0]]["image"])
    pairs, issame, folds = dm.pairs_within(chosen)
    assert pairs.tolist() == [[1, 0]] and issame.tolist() == [True] and folds.tolist() == [0]
    assert dm.pairs_within([chosen[0]])[0].shape == (0, 2)
    assert dm.report["torch_threads"] == torch.get_num_threads()


@pytest.fixture
def with_grey(faces_mini, tmp_path) -> Path:
    """Two real photos and a flat grey picture, with one pair naming the grey one."""
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1, 4]})
    (root / "Grey_Wall").mkdir()
    Image.fromarray(np.full((250, 250, 3), 128, np.uint8)).save(root / "Grey_Wall" / "Grey_Wall_0001.png")
    (root / "pairs.txt").write_text("1\t1\nAbel_Pacheco\t1\t4\nAbel_Pacheco\t1\tGrey_Wall\t1\n")
    return root


def test_no_face_policies_in_a_dataset(with_grey, align_cache):
    grey = "Grey_Wall/Grey_Wall_0001.png"
    with pytest.raises(DataError, match=r"no face was detected in 1 image\(s\): .*Grey_Wall_0001\.png"):
        make("lfw", with_grey, align_cache).setup()

    skip = make("lfw", with_grey, align_cache, on_no_face="skip")
    skip.setup()
    assert skip.dataset.ids == ["Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg"]
    assert skip.pairs.tolist() == [[0, 1]] and skip.issame.tolist() == [True]
    report = skip.report
    assert report["fallbacks"] == {"center_crop": [], "skipped": [grey]}
    assert report["pairs_dropped"] == 1
    assert report["dropped_pairs"] == [["Abel_Pacheco/Abel_Pacheco_0001.jpg", grey]]

    crop = make("lfw", with_grey, align_cache, on_no_face="center_crop")
    crop.setup()
    assert len(crop.dataset) == 3 and len(crop.pairs) == 2
    assert crop.report["fallbacks"] == {"center_crop": [grey], "skipped": []}
    assert torch.allclose(crop.dataset[2]["image"], torch.full((3, 112, 112), 128 / 255))


# -- CelebA ---------------------------------------------------------------------------------------
@pytest.fixture
def celeba_root(faces_mini, tmp_path) -> Path:
    """CelebA's own layout rebuilt from faces-mini/celeba: original file names and lists."""
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    with open(faces_mini / "celeba" / "manifest.csv", newline="") as f:
        wanted = ("celeba_07201", "celeba_07202", "celeba_07203")
        # Two photos of each of three people (CelebA photos are large: keep the test fast).
        rows = [
            r for r in csv.DictReader(f) if r["identity"] in wanted and "_0003." not in r["relative_path"]
        ]
    ident, part = [], []
    for row in rows:
        file = Path(row["source_path"]).name
        shutil.copy(faces_mini / "celeba" / row["relative_path"], root / "img_align_celeba" / file)
        number = str(int(row["identity"].split("_")[1]))
        ident.append(f"{file} {number}")
        part.append(f"{file} {2 if number == '7203' else 0}")
    (root / "identity_CelebA.txt").write_text("\n".join(ident) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return root


def test_celeba_layout_split_and_pairs(celeba_root, align_cache):
    files = sorted(p.name for p in (celeba_root / "img_align_celeba").iterdir())
    ident = dict(line.split() for line in (celeba_root / "identity_CelebA.txt").read_text().splitlines())
    by_id: dict[str, list[str]] = {}
    for file in files:
        by_id.setdefault(ident[file], []).append(file)
    a, b = by_id["7201"], by_id["7202"]
    # PRO-Face style (file names) and numbers, space-separated header.
    (celeba_root / "pairs.txt").write_text(
        f"1 2\n7201\t{a[0]}\t{a[1]}\n7202\t{int(b[0][:6])}\t{int(b[1][:6])}\n"
        f"7201\t{a[0]}\t7202\t{b[0]}\n7201\t{a[1]}\t7202\t{b[1]}\n"
    )
    dm = make("celeba", celeba_root, align_cache, split="train", pairs_file="pairs.txt")
    dm.setup()
    assert len(dm.dataset) == 4 and dm.label_names == ["7201", "7202"]
    assert dm.dataset.ids[0] == f"img_align_celeba/{files[0]}"
    assert dm.issame.tolist() == [True, True, False, False]
    labels = torch.tensor(dm.dataset.labels)
    assert torch.equal(labels[dm.pairs[:, 0]] == labels[dm.pairs[:, 1]], dm.issame)

    records, _ = make("celeba", celeba_root, align_cache).index()
    assert len(records) == 6 and {r.identity for r in records} == {"7201", "7202", "7203"}
    test_only, _ = make("celeba", celeba_root, align_cache, split="test").index()
    assert {r.identity for r in test_only} == {"7203"}

    (celeba_root / "pairs.txt").write_text(f"1 1\n7202\t{a[0]}\t{a[1]}\n7201\t{a[0]}\t7202\t{b[0]}\n")
    with pytest.raises(DataError, match=r"line 2: .* is identity 7201 .*not 7202"):
        make("celeba", celeba_root, align_cache, pairs_file="pairs.txt").index()
    with pytest.raises(ConfigError, match=r"data\.split: 'dev'"):
        make("celeba", celeba_root, align_cache, split="dev")


# -- AgeDB, CALFW, CPLFW --------------------------------------------------------------------------
PEOPLE = {"Abel_Pacheco": [1, 4], "Akhmed_Zakayev": [1, 3], "Amber_Tamblyn": [1, 2]}


def flat_copy(faces_mini: Path, folder: Path, rename) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for k, (person, n) in enumerate((p, n) for p, ns in PEOPLE.items() for n in ns):
        names.append(rename(k, person, n))
        shutil.copy(lfw_photo(faces_mini, person, n), folder / names[-1])
    return names


def test_agedb_mat_protocol(faces_mini, align_cache, tmp_path):
    root = tmp_path / "agedb"
    names = flat_copy(
        faces_mini, root / "03_Protocol_Images", lambda k, p, n: f"{k}_{p.replace('_', '')}_{30 + n}_m.jpg"
    )
    stems = [Path(n).stem for n in names]

    def split(pairs, labels):
        cells = np.empty((2, len(pairs)), dtype=object)
        for c, (i, j) in enumerate(pairs):
            cells[0, c] = {"name": stems[i], "age": 40.0}
            cells[1, c] = {"name": stems[j], "age": 41.0}
        return {"pairs": cells, "flag": np.array([labels], dtype=float)}

    splits = np.empty((2, 1), dtype=object)
    splits[0, 0] = split([(0, 1), (0, 2)], [1, -1])
    splits[1, 0] = split([(2, 3), (4, 1)], [1, -1])
    mat = root / "04_FINAL_protocol_30_years.mat"
    savemat(mat, {"splits": splits})
    # The fixture has the released structure: FaceX-Zoo's AgeDB_PairsParser indexing reads it.
    loaded = loadmat(str(mat))["splits"]
    assert loaded[1][0][0][0][0][0][0][0][0][0][0] + ".jpg" == names[2]
    assert loaded[1][0][0][0][1][0][1] == -1

    dm = make("agedb", root, align_cache)
    dm.setup()
    assert len(dm.dataset) == 6 and dm.label_names == ["AbelPacheco", "AkhmedZakayev", "AmberTamblyn"]
    assert dm.issame.tolist() == [True, False, True, False] and dm.folds.tolist() == [0, 0, 1, 1]
    ids = dm.dataset.ids
    assert [[ids[i] for i in p] for p in dm.pairs.tolist()][3] == [
        f"03_Protocol_Images/{names[4]}",
        f"03_Protocol_Images/{names[1]}",
    ]


@pytest.mark.parametrize(("name", "genuine_label"), [("calfw", "4021"), ("cplfw", "1")])
def test_calfw_cplfw_line_pairs(faces_mini, align_cache, tmp_path, name, genuine_label):
    root = tmp_path / name
    names = flat_copy(faces_mini, root / "aligned images", lambda k, p, n: f"{p}_{n:04d}.jpg")
    lines = [f"{names[0]} {genuine_label}", f"{names[1]} {genuine_label}"]
    lines += [f"{names[2]} {genuine_label}", f"{names[3]} {genuine_label}"]
    lines += [f"{names[0]} 0", f"{names[2]} 0", f"{names[4]} 0", f"{names[3]} 0"]
    pairs_file = root / f"pairs_{name.upper()}.txt"
    pairs_file.write_text("\n".join(lines) + "\n")
    dm = make(name, root, align_cache)
    dm.setup()
    assert len(dm.dataset) == 6 and dm.label_names == list(PEOPLE)
    assert dm.issame.tolist() == [True, True, False, False]
    # Fold k = the k-th slice of the genuine half plus the same slice of the impostor half.
    assert dm.folds.tolist() == [0, 5, 0, 5]
    assert dm.pairs.tolist()[2] == [0, 2]

    pairs_file.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(DataError, match=r"3 lines, but two consecutive lines form a pair"):
        make(name, root, align_cache).index()
    pairs_file.write_text("\n".join([*lines[:2], "no_label_here.jpg", lines[3]]) + "\n")
    with pytest.raises(DataError, match=r"line 3: expected '<filename> <label>'"):
        make(name, root, align_cache).index()


# -- insightface .bin -----------------------------------------------------------------------------
def test_insightface_bin(faces_mini, align_cache, tmp_path):
    photos = [lfw_photo(faces_mini, p, n) for p, ns in PEOPLE.items() for n in ns]
    crops = [r.crop for r in Aligner(align_cache).align_many(photos)]
    bins = [cv2.imencode(".jpg", cv2.cvtColor(c, cv2.COLOR_RGB2BGR))[1].tobytes() for c in crops]
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [True, False, True]), f, protocol=pickle.HIGHEST_PROTOCOL)
    dm = make("bin", path, tmp_path / "unused_cache")
    dm.setup()
    assert dm.dataset.ids == [f"{i:06d}" for i in range(6)] and dm.dataset.labels == [-1] * 6
    assert dm.pairs.tolist() == [[0, 1], [2, 3], [4, 5]] and dm.issame.tolist() == [True, False, True]
    assert dm.folds.tolist() == [0, 1, 2]
    assert dm.report["prealigned"] == 6 and dm.report["detected"] == 0
    for k in (0, 5):  # decoded RGB, not BGR: matches the crop up to JPEG loss
        image = dm.dataset[k]["image"].permute(1, 2, 0).numpy() * 255
        assert np.abs(image - crops[k]).mean() < 4
    assert not (tmp_path / "unused_cache").exists(), "a .bin needs no alignment cache"

    with open(path, "wb") as f:
        pickle.dump((bins[:5], [True, False, True]), f)
    with pytest.raises(DataError, match=r"lfw\.bin: 5 images but 3 pair labels"):
        make("bin", path, align_cache).index()


# -- BUPT -----------------------------------------------------------------------------------------
def test_bupt_layout_and_race_filter(faces_mini, align_cache, tmp_path):
    base = tmp_path / "BUPT-Balancedface" / "race_per_7000"
    for race, person, fid in [("African", "Abel_Pacheco", "m.0a1"), ("Asian", "Akhmed_Zakayev", "m.0b2")]:
        (base / race / fid).mkdir(parents=True)
        for n in PEOPLE[person]:
            shutil.copy(lfw_photo(faces_mini, person, n), base / race / fid / f"{n:02d}.jpg")
    whole = make("bupt", base.parent, align_cache)
    whole.setup()
    assert whole.dataset.ids == [
        "African/m.0a1/01.jpg",
        "African/m.0a1/04.jpg",
        "Asian/m.0b2/01.jpg",
        "Asian/m.0b2/03.jpg",
    ]
    assert whole.label_names == ["African/m.0a1", "Asian/m.0b2"] and whole.dataset.labels == [0, 0, 1, 1]
    assert whole.pairs.shape == (0, 2)
    records, _ = make("bupt", base, align_cache, races=["Asian"]).index()
    assert [r.id for r in records] == ["Asian/m.0b2/01.jpg", "Asian/m.0b2/03.jpg"]
    with pytest.raises(
        ConfigError, match=r"data\.races: \['Martian'\] not found .*available: \['African', 'Asian'\]"
    ):
        make("bupt", base, align_cache, races=["Martian"]).index()


# -- loaders, augmentation, Lightning -------------------------------------------------------------
def test_augmentation_only_in_training(faces_mini, align_cache, tmp_path):
    root = copy_lfw(faces_mini, tmp_path / "lfw", {"Abel_Pacheco": [1, 4]})
    dm = make("lfw", root, align_cache, pairs_file=None, augment={"hflip": 1.0})
    dm.setup()
    assert torch.equal(dm.train_dataset[0]["image"], dm.dataset[0]["image"].flip(-1))
    batch = next(iter(dm.predict_dataloader()))
    assert batch["id"] == dm.dataset.ids and torch.equal(batch["image"][1], dm.dataset[1]["image"])


class TinyNet(L.LightningModule):
    """A real, minimal recognizer-shaped module: conv features and an identity classifier."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 8, stride=8),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 14 * 14, 16),
        )
        self.head = torch.nn.Linear(16, classes)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.head(self.features(batch["image"])), batch["label"])
        self.losses.append(float(loss))
        return loss

    def predict_step(self, batch, batch_idx):
        return self.features(batch["image"]), batch["index"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_trainer_runs_on_the_datamodule(faces_mini, align_cache):
    dm = make(
        "lfw", faces_mini / "lfw", align_cache, subset={"pairs": 8}, batch_size=4, augment={"hflip": 0.5}
    )
    dm.setup()
    model = TinyNet(len(dm.label_names))
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    L.Trainer(fast_dev_run=True, **options).fit(model, datamodule=dm)
    assert len(model.losses) == 1 and np.isfinite(model.losses[0])
    out = L.Trainer(fast_dev_run=True, **options).predict(model, datamodule=dm)
    embeddings, index = out[0]
    assert embeddings.shape == (4, 16) and index.tolist() == [0, 1, 2, 3]


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", groups()["data"])
def test_yaml_mirrors_the_constructor(option, tmp_path):
    cfg = OmegaConf.create({"paths": {"data": str(tmp_path), "cache": str(tmp_path / "cache")}})
    cfg.data = load_option("data", option)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    cls = datamodules.DATAMODULES.get(data["name"])
    assert data["name"] == option
    assert set(data) - {"name"} == set(datamodules.arguments(cls))
    dm = datamodules.create(data)
    assert isinstance(dm, cls) and str(dm.cache_dir) == str(tmp_path / "cache" / "aligned")
