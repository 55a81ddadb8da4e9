"""Loading the paper's evaluation sets (tl_vlm.eval.data) on schema-faithful tiny copies.

Every load goes through ``load_rows`` with the registered hub ``SourceSpec`` and the tiny
copy as ``override``: the code path of a hub run, minus the hub.
"""

from __future__ import annotations

import io
import socket
import threading
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.tinydata import SCHEMAS, SPLITS, N_ROWS
from tl_vlm.eval.data import (SOURCES, ImageFetchError, ImageResolver, ScriptDatasetError,
                             SourceSpec, load_rows, open_eval_set, select_indices,
                             selection_hash, source_record, steering_pairs, to_examples,
                             vqav2_indices)

NAMES = sorted(SOURCES)


def _raw_rows(tiny_data, name: str) -> list[dict]:
    """The tiny set's rows read with pyarrow alone (an independent path to the truth)."""
    path = tiny_data.path(name) / "data" / f"{SPLITS[name]}-00000-of-00001.parquet"
    return pq.read_table(path).to_pylist()


# -- load_rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_override_directory_loads_the_real_schema(tiny_data, name):
    ds = load_rows(SOURCES[name].spec, override=str(tiny_data.path(name)))
    assert ds.features == SCHEMAS[name]
    assert len(ds) == N_ROWS[name]
    assert ds.split == SPLITS[name]


def test_parquet_glob_file_and_local_hub_id_give_the_same_rows(tiny_data):
    folder = tiny_data.path("vqav2")
    spec = SOURCES["vqav2"].spec
    by_dir = load_rows(spec, override=str(folder))
    by_glob = load_rows(spec, override=str(folder / "data" / "*.parquet"))
    by_file = load_rows(spec, override=str(next((folder / "data").glob("*.parquet"))))
    as_hub_id = load_rows(SourceSpec(str(folder), "validation"))
    for ds in (by_glob, by_file, as_hub_id):
        assert ds.features == by_dir.features
        assert list(ds["question_id"]) == list(by_dir["question_id"])
    assert list(by_dir["question_id"]) == [r["question_id"] for r in _raw_rows(tiny_data, "vqav2")]


def test_local_sources_never_touch_the_network(tiny_data, no_network, tmp_path):
    ds = load_rows(SOURCES["vqav2"].spec, override=str(tiny_data.path("vqav2")))
    assert ds[3]["image"].size == (8, 8)                          # decoding stays local too
    coco = open_eval_set("coco", override=str(tiny_data.path("coco")), n=3)
    assert coco.record["sha"] is None and "sha_error" not in coco.record
    examples = coco.examples(resolver=ImageResolver(cache_dir=tmp_path / "cache"))
    assert [ex.images[0].name for ex in examples] == list(coco.rows["filename"][:3])
    assert no_network == []
    with pytest.raises(OSError, match="network access in a test"):  # the guard is live
        socket.create_connection(("example.org", 80))
    assert len(no_network) == 1


def test_script_directory_is_refused_with_the_parquet_source_to_use(tmp_path):
    named = tmp_path / "vqav2"                     # <dir>/<dir>.py: datasets' own refusal
    named.mkdir()
    (named / "vqav2.py").write_text("import datasets\n")
    with pytest.raises(ScriptDatasetError, match="no longer supported") as err:
        load_rows(SourceSpec("HuggingFaceM4/VQAv2", "validation"), override=str(named))
    assert 'SourceSpec("lmms-lab/VQAv2", "validation")' in str(err.value)
    assert isinstance(err.value, RuntimeError)

    clone = tmp_path / "flickr_clone"              # a clone of a script repo: script, no data
    clone.mkdir()
    (clone / "flickr30k.py").write_text("import datasets\n")
    with pytest.raises(ScriptDatasetError, match="flickr30k.py") as err:
        load_rows(SourceSpec("nlphuji/flickr30k", "test"), override=str(clone))
    assert "refs/convert/parquet/TEST/test" in str(err.value)


def test_missing_paths_say_what_was_expected(tmp_path, tiny_data):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist: expected a directory"):
        load_rows(SOURCES["vqav2"].spec, override=str(missing))
    with pytest.raises(FileNotFoundError, match="neither an existing local path"):
        load_rows(SourceSpec(str(missing), "validation"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_rows(SOURCES["vqav2"].spec, override=str(missing / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected .*/data/validation-\\*.parquet"):
        load_rows(SOURCES["vqav2"].spec, override=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="Unknown split"):
        load_rows(SourceSpec("lmms-lab/VQAv2", "test"), override=str(tiny_data.path("vqav2")))


def test_hub_source_offline_says_to_pass_an_override():
    with pytest.raises(ConnectionError, match="pass a local copy as override"):
        load_rows(SOURCES["coco"].spec)                     # conftest: HF_HUB_OFFLINE=1


def test_wrong_dataset_names_the_missing_columns(tiny_data):
    imagenet_files = str(tiny_data.path("imagenet") / "data" / "*.parquet")
    with pytest.raises(ValueError, match=r"lack column\(s\) \['question'"):
        open_eval_set("vqav2", override=imagenet_files, n=2)
    with pytest.raises(ValueError, match="Unknown split \"validation\""):  # as a directory
        open_eval_set("vqav2", override=str(tiny_data.path("imagenet")), n=2)


# -- selection and provenance --------------------------------------------------------------
def test_vqav2_selection_is_the_authors_draw():
    idx = vqav2_indices(214354, 2000, 42)
    assert idx[:8] == [167621, 29184, 6556, 194393, 72097, 64196, 58513, 36579]
    assert len(set(idx)) == 2000 and select_indices("vqav2", 214354) == idx


def test_caption_and_imagenet_selection_rules():
    assert select_indices("flickr30k", 31014) == list(range(2000))
    assert select_indices("coco", 5000, n=5) == [0, 1, 2, 3, 4]
    assert select_indices("imagenet", 10000) == list(range(10000))
    with pytest.raises(ValueError, match="cannot select 2000 examples from 50 rows"):
        select_indices("vqav2", 50)


def test_recorded_selection_is_deterministic(tiny_data):
    override = str(tiny_data.path("vqav2"))
    first = open_eval_set("vqav2", override=override, n=8)
    again = open_eval_set("vqav2", override=override, n=8)
    raw = _raw_rows(tiny_data, "vqav2")
    expected_idx = vqav2_indices(50, 8, 42)
    assert first.indices == again.indices == expected_idx
    assert first.ids == [raw[i]["question_id"] for i in expected_idx]
    rec = first.record
    assert rec == again.record
    assert rec["selection_hash"] == selection_hash(first.ids) != selection_hash(first.ids[::-1])
    assert (rec["eval_set"], rec["n_rows"], rec["indices"], rec["ids"]) == (
        "vqav2", 50, expected_idx, first.ids)
    assert rec["override"] == override and rec["sha"] is None


def test_hub_record_asks_for_the_sha_only_online(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"cocoid": [1, 2]})
    rec = source_record(SOURCES["coco"].spec, ds)            # conftest: offline
    assert (rec["sha"], rec["sha_error"], rec["loaded_from"]) == (None, "offline",
                                                                  "yerevann/coco-karpathy")
    asked = []

    class FakeApi:
        def dataset_info(self, repo_id, revision=None):
            asked.append((repo_id, revision))
            return type("Info", (), {"sha": "abc123"})()

    import huggingface_hub

    from tl_vlm.eval import selection

    monkeypatch.setattr(selection, "_hub_online", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert source_record(SOURCES["flickr30k"].spec, ds)["sha"] == "abc123"
    assert source_record(SOURCES["coco"].spec, ds)["sha"] == "abc123"
    assert asked == [("nlphuji/flickr30k", "refs/convert/parquet"),
                     ("yerevann/coco-karpathy", None)]


# -- rows -> examples ------------------------------------------------------------------------
def test_vqa_examples_keep_all_ten_answers_in_order(tiny_data):
    sel = open_eval_set("vqav2", override=str(tiny_data.path("vqav2")), n=6)
    raw = _raw_rows(tiny_data, "vqav2")
    for ex, i in zip(sel.examples(), sel.indices):
        answers = tuple(a["answer"] for a in raw[i]["answers"])
        assert len(answers) == 10 and len(set(answers)) < 10        # duplicates kept
        assert ex.references == ex.answers == answers
        assert (ex.id, ex.prompt, ex.label, ex.kind) == (
            raw[i]["question_id"], raw[i]["question"], raw[i]["multiple_choice_answer"],
            raw[i]["answer_type"])
        assert ex.meta["row"] == i and ex.meta["image_id"] == raw[i]["image_id"]
        assert ex.images[0].size == (8, 8)


def test_caption_examples_carry_their_references(tiny_data, tmp_path):
    flickr = open_eval_set("flickr30k", override=str(tiny_data.path("flickr30k")), n=4)
    raw = _raw_rows(tiny_data, "flickr30k")
    assert [ex.references for ex in flickr.examples()] == [tuple(r["caption"]) for r in raw[:4]]
    assert flickr.ids == ["0", "1", "2", "3"]

    coco = open_eval_set("coco", override=str(tiny_data.path("coco")), n=2)
    raw = _raw_rows(tiny_data, "coco")
    examples = coco.examples(resolver=ImageResolver(cache_dir=tmp_path))
    assert [ex.id for ex in examples] == [r["cocoid"] for r in raw[:2]]
    assert [ex.references for ex in examples] == [tuple(r["sentences"]) for r in raw[:2]]
    png = Image.open(examples[1].images[0])
    assert png.size == (8, 8) and examples[1].meta["url"] == raw[1]["url"]


def test_imagenet_examples_answer_with_the_first_lemma(tiny_data):
    examples = open_eval_set("imagenet", override=str(tiny_data.path("imagenet"))).examples()
    raw = _raw_rows(tiny_data, "imagenet")
    assert [ex.answers[0] for ex in examples[:4]] == [
        "tench", "great white shark", "tabby", "golden retriever"]
    assert [ex.klass for ex in examples] == [r["root_label"] for r in raw]
    assert {ex.kind for ex in examples} == {"imagenet"} and examples[5].id == 5
    assert examples[0].prompt.endswith("This animal is a")


def test_steering_pairs_from_the_counterfactual_set(tiny_data):
    sel = open_eval_set("steering", override=str(tiny_data.path("steering")))
    pairs = steering_pairs(sel.rows["root_label"])
    assert pairs == [("bird.n.01", "cat.n.01"), ("dog.n.01", "fox.n.01")]
    with pytest.raises(ValueError, match="even number"):
        steering_pairs(["a", "b", "c"])


def test_class_label_column_names_the_class():
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (2, 2))], "text": ["This animal is a"], "label": [1],
         "root_label": ["fish.n.01"], "synset": ["goldfish.n.01"], "offset": ["n01443537"]},
        features=datasets.Features({**SCHEMAS["imagenet"],
                                    "label": datasets.ClassLabel(names=["tench", "goldfish"])}))
    assert to_examples("imagenet", ds)[0].answers == ("goldfish",)


# -- ImageResolver -----------------------------------------------------------------------------
PNG = io.BytesIO()
Image.new("RGB", (3, 2), "blue").save(PNG, format="PNG")
URL = "http://images.cocodataset.org/val2014/COCO_val2014_000000000042.jpg"


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_resolver_prefers_the_coco_root(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    row = dict(_raw_rows(tiny_data, "coco")[0], url=URL)
    resolver = ImageResolver(coco_root=tiny_data.coco_root(), cache_dir=tmp_path)
    assert resolver.resolve_row(row) == tiny_data.coco_root() / "val2014" / row["filename"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageResolver(coco_root=tmp_path / "missing")


def test_resolver_downloads_once_into_the_shared_cache(tmp_path, monkeypatch):
    calls = []

    def urlopen(request, timeout):
        calls.append(request.full_url)
        if len(calls) == 1:
            raise urllib.error.URLError("temporary failure")     # retried
        return FakeResponse(PNG.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    resolver = ImageResolver(cache_dir=tmp_path / "cache", backoff=0)
    path = resolver.resolve(URL)
    assert path.parent == tmp_path / "cache" and path.read_bytes() == PNG.getvalue()
    assert resolver.open(URL).getpixel((0, 0)) == (0, 0, 255)
    assert len(calls) == 2                                       # second resolve: cache hit
    assert ImageResolver(cache_dir=tmp_path / "cache").resolve(URL) == path  # another shard
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]   # no partials


def test_concurrent_shards_share_one_complete_cache_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda request, timeout: FakeResponse(PNG.getvalue()))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        ImageResolver(cache_dir=tmp_path, backoff=0).resolve(URL))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].read_bytes() == PNG.getvalue()
    assert len(list(tmp_path.iterdir())) == 1


def test_failed_download_says_how_to_work_offline(tmp_path, no_network):
    resolver = ImageResolver(cache_dir=tmp_path, retries=2, backoff=0)
    with pytest.raises(ImageFetchError) as err:
        resolver.resolve(URL, "val2014", "COCO_val2014_000000000042.jpg")
    message = str(err.value)
    assert "after 2 attempt(s)" in message and "--coco-root" in message
    assert str(tmp_path) in message and "sha1(url)" in message
    assert not list(tmp_path.iterdir())


def test_non_image_response_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda request, timeout: FakeResponse(b"<html>rate limited</html>"))
    with pytest.raises(ImageFetchError, match="did not return an image"):
        ImageResolver(cache_dir=tmp_path, retries=1).resolve(URL)
    assert not list(tmp_path.iterdir())


def test_file_urls_are_read_in_place(tiny_data, tmp_path):
    row = _raw_rows(tiny_data, "coco")[2]
    resolver = ImageResolver(cache_dir=tmp_path)
    assert resolver.resolve_row(row) == tiny_data.coco_root() / "val2014" / row["filename"]
    with pytest.raises(ImageFetchError, match="no such file"):
        resolver.resolve((tmp_path / "gone.png").as_uri())
    assert not list(tmp_path.iterdir())
