"""Bad data and damaged caches, table-driven: every case fails with a first line that names the
file or field, and leaves the storage exactly as it was (nothing lost, nothing half-written).

Most cases call the loaders and readers directly (no Ray). The job-level cases at the end run
the cache job on the session's local Ray instance: a truncated JPEG skipped at cache decode, and
damaged shards repaired by the cache job (``cache.build_if_missing``)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from distillery.platform.datasets.coco import AnnotationError, CorruptImageError, load_coco
from distillery.platform.config.sections import ConfigError, load_config
from distillery.platform.errors import DeterministicError, exit_on_user_error, find_deterministic_error
from distillery.platform.cache.feature_cache import (CacheError, CacheShardError, FeatureCache, FeatureCacheWriter,
                                               FingerprintMismatchError, parse_shard, plan_shards)

REPO = Path(__file__).resolve().parent.parent
# A fingerprint with the fields that fix the grid: [embed_dim, input/pool/patch, input/pool/patch].
FP = {"model": "tiny", "weights_sha256": "abc", "embed_dim": 8, "input_size": 64, "pool": 2, "patch_size": 8,
      "seed": 0}
GRID = [8, 4, 4]
IDS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small valid COCO dataset (4 train images, 64 px) and a finished 2-shard cache of 5 ids."""
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("pristine")
    generate_synthetic_coco(root / "data", train=4, val=1, size=64, seed=0)
    writer = FeatureCacheWriter(str(root / "cache"), FP, GRID, "fp16", 3, {"annotation_sha256": "d" * 64})
    shards = plan_shards(IDS, 3)
    writer.begin(shards)
    rng = np.random.default_rng(0)
    infos = [writer.write_shard(k, ids, rng.normal(size=(len(ids), *GRID)).astype(np.float32))
             for k, ids in enumerate(shards)]
    writer.finalize(len(shards), infos)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the table

def _ann(root: Path) -> Path:
    return root / "data" / "annotations" / "instances_train.json"


def _edit_annotations(root: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads(_ann(root).read_text())
    edit(doc)
    _ann(root).write_text(json.dumps(doc))


def _load(root: Path, **kw):
    return lambda: load_coco(str(_ann(root)), str(root / "data" / "images" / "train"), **kw)


def _manifest(root: Path) -> Path:
    return root / "cache" / "manifest.json"


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads(_manifest(root).read_text())
    edit(doc)
    _manifest(root).write_text(json.dumps(doc))


def _open_and_read(root: Path, fingerprint=FP):
    """What the training driver does (open_training_cache): manifest, listing, id columns."""
    def run():
        cache = FeatureCache(str(root / "cache"), expected_fingerprint=fingerprint)
        cache.check_shards()
        cache.check_covers(IDS)
    return run


def _read_grids(root: Path):
    """What a reader of the grids does (an ingest task, ``get``): every shard verified as it is read."""
    def run():
        cache = FeatureCache(str(root / "cache"), expected_fingerprint=FP)
        for image_id in IDS:
            cache.get(image_id)
    return run


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _truncate_jpeg(path: Path) -> None:
    """Cut off the end of the entropy-coded data: the header (and the header check) stays valid."""
    _truncate(path, int(path.stat().st_size * 0.7))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _setup_unknown_category(r):
    _edit_annotations(r, lambda d: d["annotations"][0].update(category_id=999))


def flip_feature_byte(path: Path) -> None:
    """Flip one byte in the middle of the shard's ``features`` column chunk (ids and footer intact)."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(0).column(2)
    assert column.path_in_schema == "features"
    data = bytearray(path.read_bytes())
    start = min(o for o in (column.dictionary_page_offset, column.data_page_offset) if o is not None)
    data[start + column.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncated_shard_with_edited_size(r):
    shard = r / "cache" / "shard-00001.parquet"
    _truncate(shard, 300)
    _edit_manifest(r, lambda d: d["shards"][1].update(bytes=300))
    return shard


def _exif_turned(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _rotated_photo_with_its_stored_size(r):
    """Image 2 becomes a phone JPEG stored 64x32 with orientation 6 (displayed 32x64); its record
    keeps the stored size, as a tool that ignores EXIF writes it."""
    from PIL import Image

    Image.new("RGB", (64, 32), (200, 30, 30)).save(r / "data/images/train/00000002.jpg", exif=_exif_turned(6))

    def edit(d):
        d["images"][1].update(width=64, height=32)
        for a in d["annotations"]:
            if a["image_id"] == 2:
                a["bbox"] = [1, 1, 5, 5]
    _edit_annotations(r, edit)


def _float_tiff_as_image_3(r):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.float32)).save(r / "data/images/train/00000003.tif")
    _edit_annotations(r, lambda d: d["images"][2].update(file_name="00000003.tif"))


def _roboflow_export(r):
    """The pristine train split as Roboflow exports COCO: train/_annotations.coco.json beside its images."""
    shutil.copytree(r / "data/images/train", r / "rf/train")
    shutil.copy(_ann(r), r / "rf/train/_annotations.coco.json")


def _prepare_dataset(root: Path, *overrides: str):
    """What a job's driver does first (jobs/distill.py data.root=ROOT ...): generate the synthetic
    dataset when configured and absent, then load the train split."""
    def run():
        from distillery.platform.cache.job import CacheFeaturesConfig, ensure_dataset
        from distillery.platform.datasets.formats import load_split

        cfg = load_config(CacheFeaturesConfig, None, [f"data.root={root}", *overrides])
        ensure_dataset(cfg.data)
        load_split(cfg.data, "train")
    return run


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


@dataclass
class Case:
    id: str
    setup: Callable[[Path], object]  # damages the copy of the pristine tree; may return anything
    action: Callable[[Path], Callable[[], object]]  # what a user runs, given the tree
    error: type[BaseException]
    first_line: str  # a regex the first line of the message must match (names the file or field)


CASES = [
    # --- annotation files
    Case("annotation file missing", lambda r: _ann(r).unlink(), _load, AnnotationError,
         r"annotation file not found: .*instances_train\.json$"),
    Case("annotation JSON broken", lambda r: _write_text(_ann(r), '{"images": ['), _load, AnnotationError,
         r".*instances_train\.json: malformed JSON"),
    Case("annotation top level a list", lambda r: _write_text(_ann(r), "[]"), _load, AnnotationError,
         r".*instances_train\.json: top level must be a JSON object"),
    Case("'images' missing", lambda r: _edit_annotations(r, lambda d: d.pop("images")), _load, AnnotationError,
         r".*instances_train\.json: missing or non-list 'images'"),
    Case("category without an id", lambda r: _edit_annotations(r, lambda d: d["categories"][0].pop("id")),
         _load, AnnotationError, r".*instances_train\.json: categories\[0\] needs an integer 'id'"),
    Case("duplicate category id",
         lambda r: _edit_annotations(r, lambda d: d["categories"].append(dict(d["categories"][0]))),
         _load, AnnotationError, r".*instances_train\.json: categories\[\d+\]: duplicate category id"),
    Case("no categories", lambda r: _edit_annotations(r, lambda d: d.update(categories=[])), _load,
         AnnotationError, r".*instances_train\.json: no categories"),
    Case("empty annotations list", lambda r: _edit_annotations(r, lambda d: d.update(annotations=[])), _load,
         AnnotationError, r".*instances_train\.json: 'annotations' is empty: there are no boxes"),
    Case("every annotation skipped",
         lambda r: _edit_annotations(r, lambda d: [a.update(category_id=999) for a in d["annotations"]]),
         lambda r: _load(r, bad_records="skip", report_uri=str(r.parent / "report.jsonl")), AnnotationError,
         r".*instances_train\.json: none of its \d+ annotations is usable"),
    Case("image record without width", lambda r: _edit_annotations(r, lambda d: d["images"][1].pop("width")),
         _load, AnnotationError, r".*instances_train\.json: image 2: image record needs integer id"),
    Case("duplicate image id",
         lambda r: _edit_annotations(r, lambda d: d["images"].append(dict(d["images"][0]))), _load,
         AnnotationError, r".*instances_train\.json: image 1: duplicate image id"),
    Case("unknown category id", _setup_unknown_category, _load, AnnotationError,
         r".*instances_train\.json: annotation 1: unknown category id 999"),
    Case("annotation of an unknown image",
         lambda r: _edit_annotations(r, lambda d: d["annotations"][0].update(image_id=77)), _load,
         AnnotationError, r".*instances_train\.json: annotation 1: refers to unknown image id 77"),
    Case("annotation without bbox", lambda r: _edit_annotations(r, lambda d: d["annotations"][0].pop("bbox")),
         _load, AnnotationError, r".*instances_train\.json: annotation 1: annotation needs image_id, category_id"),
    Case("bbox of 3 numbers",
         lambda r: _edit_annotations(r, lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), _load,
         AnnotationError, r".*instances_train\.json: annotation 1: bbox must be 4 finite numbers"),
    Case("bbox of zero width",
         lambda r: _edit_annotations(r, lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 3])), _load,
         AnnotationError, r".*instances_train\.json: annotation 1: bbox .* has non-positive size"),
    Case("bbox outside the image",
         lambda r: _edit_annotations(r, lambda d: d["annotations"][0].update(bbox=[60, 2, 30, 3])), _load,
         AnnotationError, r".*instances_train\.json: annotation 1: bbox .* lies outside image 1 \(64x64\)"),
    Case("skip without a report path", _setup_unknown_category, lambda r: _load(r, bad_records="skip"),
         AnnotationError, r".*instances_train\.json: 1 bad records skipped but no report path"),
    # --- image files
    Case("image file missing", lambda r: (r / "data/images/train/00000002.jpg").unlink(),
         lambda r: _load(r, check_images="exists"), AnnotationError,
         r".*instances_train\.json: image 2: image file is missing: .*00000002\.jpg$"),
    Case("image not an image", lambda r: _write_text(r / "data/images/train/00000003.jpg", "hello"), _load,
         AnnotationError, r".*instances_train\.json: image 3: image does not decode: .*00000003\.jpg$"),
    Case("truncated JPEG at decode check", lambda r: _truncate_jpeg(r / "data/images/train/00000003.jpg"),
         lambda r: _load(r, check_images="decode"), AnnotationError,
         r".*instances_train\.json: image 3: image does not decode: .*00000003\.jpg$"),
    Case("truncated JPEG at cache decode", lambda r: _truncate_jpeg(r / "data/images/train/00000003.jpg"),
         lambda r: lambda: __import__("distillery.platform.cache.job", fromlist=["_decode_shard"])._decode_shard(
             {"shard": 0, "image_ids": [3], "uris": [str(r / "data/images/train/00000003.jpg")]}, 32),
         CorruptImageError, r".*00000003\.jpg"),
    Case("phone photo whose record has the stored size", _rotated_photo_with_its_stored_size, _load, AnnotationError,
         r".*instances_train\.json: image 2: image is 32x64 as displayed \(EXIF orientation 6 turns its stored "
         r"64x32 pixels\) but the annotation says 64x32: .*exiftool -Orientation= FILE\): .*00000002\.jpg$"),
    Case("file_name with Windows separators",
         lambda r: _edit_annotations(r, lambda d: d["images"][1].update(file_name="train\\00000002.jpg")),
         lambda r: _load(r, check_images="exists"), AnnotationError,
         r".*instances_train\.json: image 2: image file is missing \(its file_name separates folders with '\\'; "
         r"COCO paths use '/'\): .*train\\00000002\.jpg$"),
    Case("32-bit float TIFF at decode check", _float_tiff_as_image_3, lambda r: _load(r, check_images="decode"),
         AnnotationError, r".*instances_train\.json: image 3: image does not decode: 32-bit floating-point pixels "
                          r"\(mode F\) .*: .*00000003\.tif$"),
    Case("iPhone HEIC saved as .jpg", lambda r: (r / "data/images/train/00000002.jpg").write_bytes(HEIC), _load,
         AnnotationError, r".*instances_train\.json: image 2: image does not decode: a HEIC/HEIF/AVIF photo .*"
                          r"convert it to JPEG or PNG: .*00000002\.jpg$"),
    Case("not an image, at training decode", lambda r: _write_text(r / "data/images/train/00000003.jpg", "hello"),
         lambda r: lambda: __import__("distillery.platform.datasets.coco", fromlist=["x"]).load_image_resized(
             str(r / "data/images/train/00000003.jpg"), 32), CorruptImageError,
         r"image does not decode: .*00000003\.jpg: not an image file Pillow can identify \(JPEG, PNG"),
    # --- datasets a job is pointed at
    Case("own photos folder with data.synthetic left on", lambda r: _write_text(r / "data/images/notes.txt", "x"),
         lambda r: _prepare_dataset(r / "data" / "images"), AnnotationError,
         r"annotation file not found: .*images/annotations/instances_train\.json; data\.root .*images holds other "
         r"files \(notes\.txt, train, val\), so the synthetic dataset \(data\.synthetic\) is not generated there"),
    Case("Roboflow COCO export with the default paths", _roboflow_export, lambda r: _prepare_dataset(r / "rf"),
         AnnotationError, r"annotation file not found: .*rf/annotations/instances_train\.json; .*rf holds a Roboflow "
                          r"COCO export \(train/_annotations\.coco\.json\): read it with data\.train_annotations="
                          r"train/_annotations\.coco\.json data\.train_images=train .* data\.synthetic=null$"),
    Case("Roboflow COCO export, synthetic off", _roboflow_export,
         lambda r: _prepare_dataset(r / "rf", "data.synthetic=null"), AnnotationError,
         r"annotation file not found: .*; .*rf holds a Roboflow COCO export .*data\.val_images=valid$"),
    # --- the feature cache
    Case("shard checksum zeroed in the manifest",
         lambda r: _edit_manifest(r, lambda d: d["shards"][1].update(sha256="0" * 64)), _read_grids,
         CacheShardError, r"cache shard .*shard-00001\.parquet does not match its checksum in .*manifest\.json"),
    Case("shard bytes flipped", lambda r: _flip_byte(r / "cache/shard-00000.parquet"), _read_grids,
         CacheShardError, r"cache shard .*shard-00000\.parquet does not match its checksum in .*manifest\.json"),
    Case("shard truncated", lambda r: _truncate(r / "cache/shard-00001.parquet", 300), _open_and_read,
         CacheShardError, r"cache shard .*shard-00001\.parquet has 300 bytes, .*manifest\.json records \d+"),
    Case("shard truncated, size edited too", _truncated_shard_with_edited_size, _open_and_read, CacheShardError,
         r"cache shard .*shard-00001\.parquet is not a readable Parquet file .*: rerun the cache job to repair it"),
    Case("shard damaged under a training ingest task", lambda r: _flip_byte(r / "cache/shard-00001.parquet"),
         lambda r: lambda: __import__("distillery.platform.engine.ingest", fromlist=["x"]).image_rows_of_shard(
             {"uri": str(r / "cache/shard-00001.parquet"), "manifest": str(_manifest(r)),
              "sha256": json.loads(_manifest(r).read_text())["shards"][1]["sha256"]}, 1), CacheShardError,
         r"cache shard .*shard-00001\.parquet does not match its checksum in .*manifest\.json"),
    Case("shard bytes not Parquet", lambda r: None,
         lambda r: lambda: parse_shard(b"PAR1 garbage", str(r / "cache/shard-00000.parquet")), CacheShardError,
         r"cache shard .*shard-00000\.parquet is not a readable Parquet file"),
    Case("shard deleted", lambda r: (r / "cache/shard-00001.parquet").unlink(), _open_and_read, CacheShardError,
         r"cache shard .*shard-00001\.parquet is missing \(listed in .*manifest\.json\)"),
    Case("grid edited by hand", lambda r: _edit_manifest(r, lambda d: d.update(grid=[8, 8, 2])), _open_and_read,
         CacheError, r".*manifest\.json: grid \[8, 8, 2\] is not the grid of the teacher"),
    Case("grid of two numbers", lambda r: _edit_manifest(r, lambda d: d.update(grid=[8, 16])), _open_and_read,
         CacheError, r".*manifest\.json: grid must be \[channels, height, width\]"),
    Case("dtype edited", lambda r: _edit_manifest(r, lambda d: d.update(dtype="fp32")), _open_and_read,
         CacheError, r".*manifest\.json: dtype must be 'fp16', 'int8' or 'pca', got 'fp32'"),
    Case("count edited", lambda r: _edit_manifest(r, lambda d: d.update(count=99)), _open_and_read, CacheError,
         r".*manifest\.json: count 99 is not the sum of the shards' counts \(5\)"),
    Case("shard renamed in the manifest",
         lambda r: _edit_manifest(r, lambda d: d["shards"][1].update(name="other.parquet")), _open_and_read,
         CacheError, r".*manifest\.json: shards\[1\]\.name must be 'shard-00001\.parquet'"),
    Case("fingerprint removed", lambda r: _edit_manifest(r, lambda d: d.pop("fingerprint")), _open_and_read,
         CacheError, r".*manifest\.json: fingerprint must be the teacher's fingerprint"),
    Case("manifest not JSON", lambda r: _write_text(_manifest(r), "{"), _open_and_read, CacheError,
         r".*manifest\.json is not valid JSON"),
    Case("manifest missing, build unfinished", lambda r: _manifest(r).unlink(), _open_and_read, CacheError,
         r"no feature cache at .*cache: .*manifest\.json not found \(a build was started but not finished"),
    Case("cache of another teacher", lambda r: None, lambda r: _open_and_read(r, {**FP, "seed": 1}),
         FingerprintMismatchError, r"feature cache .*cache was made by another teacher \(fields differ: seed\)$"),
    Case("cache lacks an image", lambda r: None,
         lambda r: lambda: FeatureCache(str(r / "cache")).check_covers([*IDS, 99]), CacheError,
         r"feature cache .*cache lacks 1 images of the dataset: 99$"),
    Case("cache with another number of views", lambda r: None,
         lambda r: lambda: FeatureCache(str(r / "cache")).check_views(4), CacheError,
         r"feature cache .*cache has 1 view\(s\) per image but cache\.views=4 is configured"),
    Case("resume with another plan", lambda r: None,
         lambda r: lambda: FeatureCacheWriter(str(r / "cache"), FP, GRID, "int8", 3, {}).begin(plan_shards(IDS, 3)),
         CacheError, r"cache .*cache was started with a different plan \(fields differ: dataset, dtype\)"),
    Case("no cache and no build", lambda r: shutil.rmtree(r / "cache"),
         lambda r: lambda: __import__("distillery.platform.cache.job", fromlist=["x"]).open_training_cache(
             str(r / "cache"), FP, IDS), CacheError,
         r"no feature cache at .*cache \(.*manifest\.json not found\): build it with jobs/cache_features\.py"),
    # --- data settings
    Case("unknown bad_records policy", lambda r: None,
         lambda r: lambda: load_config(__import__("distillery.platform.cache.job", fromlist=["x"]).CacheFeaturesConfig,
                                       None, ["data.bad_records=ignore"]),
         ConfigError, r"invalid configuration \(embedded default \+ overrides data\.bad_records=ignore\):$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_a_clear_first_line(case, pristine, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    case.setup(root)
    action = case.action(root)
    before = _snapshot(root)
    with pytest.raises(case.error) as info:
        action()
    first = str(info.value).splitlines()[0]
    assert re.match(case.first_line, first), f"first line: {first!r}"
    assert isinstance(info.value, DeterministicError), "a retry cannot fix this: it must not be retried"
    assert _snapshot(root) == before, "the failed call changed the files"
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_a_shard_damaged_after_the_driver_check_fails_the_ingest_naming_it(ray_local, pristine, tmp_path):
    """The driver's coverage check reads the id columns only; the grids' bytes are verified where
    the training ingest reads them: a byte flipped inside the features fails the Ray Data task
    with the shard's name and the repair command, as the original error class (no retry)."""
    from distillery.platform.engine.ingest import build_train_dataset
    from distillery.platform.engine.launch import configure_ray_data

    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    flip_feature_byte(root / "cache" / "shard-00001.parquet")
    dataset = load_coco(_ann(root), root / "data" / "images" / "train", check_images="none")
    cache = FeatureCache(str(root / "cache"), expected_fingerprint=FP)
    cache.check_shards()
    cache.check_covers(dataset.image_ids)  # ids only: passes
    configure_ray_data()
    with pytest.raises(CacheShardError, match=r"shard-00001\.parquet does not match its checksum .*rerun the cache"):
        list(build_train_dataset(dataset, cache).iter_batches(batch_size=2))


def test_damage_messages_say_how_to_repair(pristine, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    _edit_manifest(root, lambda d: d["shards"][0].update(sha256="0" * 64))
    with pytest.raises(CacheShardError) as info:
        _read_grids(root)()
    assert "rerun the cache job to repair it" in str(info.value)
    assert info.value.shard_uri.endswith("shard-00000.parquet") and info.value.manifest_uri.endswith("manifest.json")
    with pytest.raises(FingerprintMismatchError) as info:
        _open_and_read(root, {**FP, "seed": 1})()
    assert "point cache.uri at a cache built with this teacher" in str(info.value)
    assert "new cache.uri" in str(info.value) and "teacher.*" in str(info.value)


@pytest.mark.parametrize("damage", ["zeroed checksum", "flipped bytes", "truncated", "deleted"])
def test_rerun_of_the_writer_recomputes_exactly_the_damaged_shard(damage, pristine, tmp_path):
    """The cache job's repair path without Ray: ``begin`` keeps intact shards and hands back the
    damaged one to recompute (a zeroed checksum recomputes the shard it names)."""
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    shard = root / "cache" / "shard-00001.parquet"
    {"zeroed checksum": lambda: _edit_manifest(root, lambda d: d["shards"][1].update(sha256="0" * 64)),
     "flipped bytes": lambda: _flip_byte(shard), "truncated": lambda: _truncate(shard, 300),
     "deleted": shard.unlink}[damage]()
    writer = FeatureCacheWriter(str(root / "cache"), FP, GRID, "fp16", 3, {"annotation_sha256": "d" * 64})
    assert writer.begin(plan_shards(IDS, 3)) == [1]
    assert not shard.exists() and (root / "cache" / "shard-00000.parquet").exists()


# --------------------------------------------------------------------------- error plumbing

class _WorkerGroupFailure(RuntimeError):
    """Shaped like Ray Train's worker-group error: the workers' exceptions by rank."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_deterministic_error_is_found_through_wrappers():
    inner = CacheShardError("cache shard s3://b/c/shard-00001.parquet is missing")
    wrapped = _WorkerGroupFailure({0: RuntimeError("a peer failed"), 1: inner})
    assert find_deterministic_error(wrapped) is inner
    try:
        try:
            raise inner
        except CacheShardError as exc:
            raise RuntimeError("the job failed") from exc
    except RuntimeError as chained:
        assert find_deterministic_error(chained) is inner
    assert find_deterministic_error(_WorkerGroupFailure({0: OSError("node lost")})) is None


def test_cli_prints_one_error_line_and_exits_2(capsys):
    def run():
        raise _WorkerGroupFailure({0: FingerprintMismatchError("feature cache /c was made by another teacher\n"
                                                               "  expected: ...")})
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(run)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: feature cache /c was made by another teacher"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_on_user_error(lambda: 1 / 0)


def test_cache_job_cli_broken_annotations_error_line(pristine, tmp_path):
    """The job as a user types it: a broken annotation file fails before Ray starts, with one
    ``error:`` line naming the file, no traceback, exit status 2, and no cache written."""
    root = tmp_path / "tree"
    shutil.copytree(pristine / "data", root)
    _write_text(root / "annotations" / "instances_train.json", '{"images": [')
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "cache_features.py"), f"data.root={root}",
                           "data.synthetic=null", f"cache.uri={tmp_path / 'cache'}", "teacher.allow_random_init=true"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines and lines[0].startswith(f"error: {root / 'annotations' / 'instances_train.json'}: malformed JSON")
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- job level (Ray)

def _tiny_job(data_root, cache_uri, *extra):
    from distillery.platform.cache.job import CacheFeaturesConfig

    return load_config(CacheFeaturesConfig, None, [
        f"data.root={data_root}", "data.synthetic=null", f"cache.uri={cache_uri}", "cache.shard_size=3",
        "teacher.allow_random_init=true", "teacher.input_size=64",
        "teacher.model_kwargs={embed_dim: 16, depth: 1, num_heads: 2}", *extra])


def test_truncated_jpeg_skipped_at_cache_decode(ray_local, pristine, tmp_path):
    """``data.bad_records=skip``: the header check at load passes a truncated JPEG; the cache
    decode skips it, reports it, records it in the manifest; training does not expect it."""
    from distillery.platform.cache.job import build_teacher, open_training_cache, run_cache_job

    data = tmp_path / "data"
    shutil.copytree(pristine / "data", data)
    _truncate_jpeg(data / "images" / "train" / "00000003.jpg")
    with pytest.raises(Exception) as info:  # the default policy: the job fails naming the file
        run_cache_job(_tiny_job(data, tmp_path / "strict"))
    found = find_deterministic_error(info.value)
    assert isinstance(found, CorruptImageError) and "00000003.jpg" in str(found).splitlines()[0]
    assert not (tmp_path / "strict" / "train" / "manifest.json").exists()

    cfg = _tiny_job(data, tmp_path / "cache", "data.bad_records=skip")
    summary = run_cache_job(cfg)["train"]
    assert summary["skipped_images"] == 1 and summary["images"] == 3
    manifest = json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text())
    assert [(r["image_id"], Path(r["uri"]).name) for r in manifest["skipped"]] == [(3, "00000003.jpg")]
    fingerprint = build_teacher(cfg.teacher.model_dump(), "float32").fingerprint
    cache = open_training_cache(summary["uri"], fingerprint, [1, 2, 3, 4])  # 3 is left out, not "missing"
    assert sorted(cache.index) == [1, 2, 4]
    # A rerun keeps every shard (the partial one included) and the skip record.
    again = run_cache_job(cfg)["train"]
    assert again["shards_computed"] == 0 and again["skipped_images"] == 1


def test_damaged_cache_is_repaired_when_build_if_missing(ray_local, pristine, tmp_path):
    from distillery.platform.cache.job import build_teacher, open_training_cache, run_cache_job

    cfg = _tiny_job(pristine / "data", tmp_path / "cache")
    uri = run_cache_job(cfg)["train"]["uri"]
    original = (tmp_path / "cache" / "train" / "manifest.json").read_bytes()
    fingerprint = build_teacher(cfg.teacher.model_dump(), "float32").fingerprint
    (tmp_path / "cache" / "train" / "shard-00001.parquet").unlink()
    _flip_byte(tmp_path / "cache" / "train" / "shard-00000.parquet")
    with pytest.raises(CacheShardError, match="shard-00001.parquet is missing"):
        open_training_cache(uri, fingerprint, [1, 2, 3, 4])  # no build: says how to repair, repairs nothing
    builds = []
    cache = open_training_cache(uri, fingerprint, [1, 2, 3, 4],
                                build=lambda: builds.append(run_cache_job(cfg)["train"]))
    # One rebuild repaired both (the deleted and the corrupted shard), and nothing else.
    assert len(builds) == 1 and builds[0]["shards_computed"] == 2 and builds[0]["shards_reused"] == 0
    assert (tmp_path / "cache" / "train" / "manifest.json").read_bytes() == original
    cache.verify()
