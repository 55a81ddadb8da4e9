"""Tiny copies of the paper's evaluation datasets, saved like the hub's parquet repos.

Each builder writes ``<root>/<name>/data/<split>-00000-of-00001.parquet`` with exactly
the columns and feature types of the real dataset (:data:`SCHEMAS`, from the dataset
cards / loading scripts; eval spec section 2) and small random PIL images, so that
``load_rows(SOURCES[name].spec, override=<root>/<name>)`` goes through the same
``load_dataset`` call as on the hub. The session-scoped ``tiny_data`` fixture
(tests/conftest.py) builds each set once per run.

COCO Karpathy rows hold ``file://`` URLs of PNGs written under ``<root>/coco/images``,
laid out as ``<filepath>/<filename>`` so the same files also serve as a ``coco_root``.
Schema details marked [U] in the eval spec (COCO integer widths, ImageNet column types
and order) follow the most likely form and are to be checked on a host with hub access.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value

from tests.tiny import image

SCHEMAS: dict[str, Features] = {
    # lmms-lab/VQAv2 dataset card (dataset_info.features), in its column order.
    "vqav2": Features({
        "question_type": Value("string"),
        "multiple_choice_answer": Value("string"),
        "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                         "answer_id": Value("int64")}),
        "image_id": Value("int64"),
        "answer_type": Value("string"),
        "question_id": Value("int64"),
        "question": Value("string"),
        "image": Image(),
    }),
    # nlphuji/flickr30k's script features (its parquet conversion keeps them).
    "flickr30k": Features({
        "image": Image(),
        "caption": List(Value("string")),
        "sentids": List(Value("string")),
        "split": Value("string"),
        "img_id": Value("string"),
        "filename": Value("string"),
    }),
    # yerevann/coco-karpathy: Karpathy's json fields plus the image URL [U widths].
    "coco": Features({
        "filepath": Value("string"),
        "sentids": List(Value("int64")),
        "filename": Value("string"),
        "imgid": Value("int64"),
        "split": Value("string"),
        "sentences": List(Value("string")),
        "cocoid": Value("int64"),
        "url": Value("string"),
    }),
    # The authors' ImageNet subsets: the columns of their batch saver [U types].
    "imagenet": Features({
        "image": Image(),
        "text": Value("string"),
        "label": Value("string"),
        "root_label": Value("string"),
        "synset": Value("string"),
        "offset": Value("string"),
    }),
}
SCHEMAS["steering"] = SCHEMAS["imagenet_open"] = SCHEMAS["imagenet"]

SPLITS = {"vqav2": "validation", "flickr30k": "test", "coco": "test", "imagenet": "train",
          "imagenet_open": "train", "steering": "train"}
N_ROWS = {"vqav2": 50, "flickr30k": 12, "coco": 6, "imagenet": 12, "imagenet_open": 12,
          "steering": 8}

WORDS = ["red", "blue", "two", "yes", "no", "cat", "dog", "left"]
ANIMALS = [  # (label: lemma list, synset, wnid offset, root label)
    ("tench, Tinca_tinca", "tench.n.01", "n01440764", "fish.n.01"),
    ("great_white_shark, white_shark", "great_white_shark.n.01", "n01484850", "fish.n.01"),
    ("tabby, tabby_cat", "tabby.n.01", "n02123045", "cat.n.01"),
    ("golden_retriever", "golden_retriever.n.01", "n02099601", "dog.n.01"),
    ("king_penguin, Aptenodytes_patagonica", "king_penguin.n.01", "n02056570", "bird.n.01"),
    ("kit_fox, Vulpes_macrotis", "kit_fox.n.01", "n02119789", "fox.n.01"),
]
IMAGENET_TEXT = "Answer the question using a single word, number, or short phrase. This animal is a"


def _vqav2(n: int, rng: random.Random, root: Path) -> dict:
    rows: dict[str, list] = {k: [] for k in SCHEMAS["vqav2"]}
    for i in range(n):
        answers = [rng.choice(WORDS[:4]) for _ in range(10)]   # duplicates on purpose
        rows["answers"].append([
            {"answer": a, "answer_confidence": rng.choice(["yes", "maybe", "no"]),
             "answer_id": j + 1} for j, a in enumerate(answers)])
        rows["multiple_choice_answer"].append(Counter(answers).most_common(1)[0][0])
        rows["question_type"].append(rng.choice(["what color is the", "how many", "is the"]))
        rows["answer_type"].append(rng.choice(["other", "number", "yes/no"]))
        rows["image_id"].append(100 + i // 3)
        rows["question_id"].append((100 + i // 3) * 1000 + i % 3)
        rows["question"].append(f"question {i}: what is this?")
        rows["image"].append(image(i, (8, 8)))
    return rows


def _flickr30k(n: int, rng: random.Random, root: Path) -> dict:
    return {
        "image": [image(100 + i, (8, 8)) for i in range(n)],
        "caption": [[f"a {rng.choice(WORDS)} thing number {i} in picture {k} ." for k in range(5)]
                    for i in range(n)],
        "sentids": [[str(5 * i + k) for k in range(5)] for i in range(n)],
        "split": [rng.choice(["train", "val", "test"]) for _ in range(n)],
        "img_id": [str(i) for i in range(n)],
        "filename": [f"{1000092795 + i}.jpg" for i in range(n)],
    }


def _coco(n: int, rng: random.Random, root: Path) -> dict:
    folder = root / "images" / "val2014"
    folder.mkdir(parents=True)
    rows: dict[str, list] = {k: [] for k in SCHEMAS["coco"]}
    for i in range(n):
        cocoid = 391895 + 7 * i
        filename = f"COCO_val2014_{cocoid:012d}.png"
        image(200 + i, (8, 8)).save(folder / filename)
        rows["filepath"].append("val2014")
        rows["sentids"].append([770337 + 5 * i + k for k in range(5)])
        rows["filename"].append(filename)
        rows["imgid"].append(i)
        rows["split"].append("test")
        rows["sentences"].append([f"A {rng.choice(WORDS)} photo, number {i}/{k}." for k in range(5)])
        rows["cocoid"].append(cocoid)
        rows["url"].append((folder / filename).as_uri())
    return rows


def _imagenet_like(classes: list[tuple[str, str, str, str]]):
    def rows(n: int, rng: random.Random, root: Path) -> dict:
        picked = [classes[i % len(classes)] for i in range(n)]
        return {
            "image": [image(300 + i, (8, 8)) for i in range(n)],
            "text": [IMAGENET_TEXT] * n,
            "label": [c[0] for c in picked],
            "root_label": [c[3] for c in picked],
            "synset": [c[1] for c in picked],
            "offset": [c[2] for c in picked],
        }
    return rows


BUILDERS = {"vqav2": _vqav2, "flickr30k": _flickr30k, "coco": _coco,
            "imagenet": _imagenet_like(ANIMALS[:4]),
            "imagenet_open": _imagenet_like(ANIMALS[:4]),   # the ImageNet rows again
            "steering": _imagenet_like(ANIMALS[2:])}   # 4 root labels: 2 pairs


def build(name: str, root: Path) -> Path:
    """Write the tiny ``name`` set under ``root / name``; returns that directory."""
    target = Path(root) / name
    target.mkdir(parents=True)
    rows = BUILDERS[name](N_ROWS[name], random.Random(name), target)
    ds = Dataset.from_dict(rows, features=SCHEMAS[name])
    ds.to_parquet(str(target / "data" / f"{SPLITS[name]}-00000-of-00001.parquet"))
    return target


class TinyData:
    """Builds each tiny set on first request and remembers where it is."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._paths: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = build(name, self.root)
        return self._paths[name]

    def coco_root(self) -> Path:
        """The COCO PNGs laid out as ``<filepath>/<filename>`` (a ``coco_root``)."""
        return self.path("coco") / "images"
