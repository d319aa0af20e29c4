"""Phrase embeddings computed once per (encoder, vocabulary), kept in memory and optionally on disk.

See :mod:`.text` for why the open-vocabulary detector caches its phrase embeddings (late fusion:
the vision side never sees the text, so the text encoder never runs in the training loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .text import PhraseEncoder, canonical_json, check_phrases, encoder_fingerprint

__all__ = ["PhraseEmbeddingCache"]

_CACHE_FORMAT = "distillery.phrase_embeddings/v1"
_TENSOR_KEY = "embeddings"


class PhraseEmbeddingCache:
    """Phrase embeddings computed once per (encoder, vocabulary), kept in memory and optionally on disk.

    In memory the key is ``(fingerprint digest, tuple(phrases))``. On disk (``directory``, a local
    path; the platform layer stages S3) an entry is two files named by the sha256 of the canonical
    JSON of ``{"encoder": fingerprint, "phrases": phrases}``:

    * ``<key>.safetensors``: one float32 tensor ``embeddings`` (P, dim); its header metadata
      repeats the key, tying it to its sidecar;
    * ``<key>.json``: the sidecar, with the format tag, key, encoder fingerprint, phrases and shape.

    The sidecar is written last (each file atomically: a temporary file, then ``os.replace``), so it
    marks a complete entry; a tensor without a sidecar is an interrupted write and is recomputed.
    A sidecar whose encoder fingerprint or phrases differ from the request (a renamed or edited
    file) is refused with a ValueError naming the file and what differs.

    ``get`` returns a fresh copy each time, so callers may modify it freely.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is not None and "://" in str(directory):
            raise ValueError(f"PhraseEmbeddingCache: directory must be a local path, got {str(directory)!r}; "
                             f"stage remote storage through distillery.platform.io.storage")
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded": 0}

    @staticmethod
    def key(encoder: PhraseEncoder, phrases: Sequence[str]) -> str:
        """The on-disk key: sha256 of canonical JSON of the encoder fingerprint and the phrases."""
        phrases = check_phrases(phrases, "PhraseEmbeddingCache.key")
        return hashlib.sha256(canonical_json({"encoder": encoder_fingerprint(encoder), "phrases": phrases}).encode()).hexdigest()

    def paths(self, encoder: PhraseEncoder, phrases: Sequence[str]) -> tuple[Path, Path] | None:
        """(tensor file, sidecar) for this entry, or None without a directory."""
        if self.directory is None:
            return None
        key = self.key(encoder, phrases)
        return self.directory / f"{key}.safetensors", self.directory / f"{key}.json"

    def get(self, encoder: PhraseEncoder, phrases: Sequence[str]) -> torch.Tensor:
        """(P, encoder.dim) float32 L2-normalised embeddings of ``phrases``, encoded at most once."""
        phrases = check_phrases(phrases, "PhraseEmbeddingCache.get")
        fingerprint = encoder_fingerprint(encoder)
        memory_key = (hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest(), tuple(phrases))
        cached = self._memory.get(memory_key)
        if cached is not None:
            self.stats["memory_hits"] += 1
            return cached.clone()

        embeddings = self._read_disk(encoder, fingerprint, phrases) if self.directory is not None else None
        if embeddings is not None:
            self.stats["disk_hits"] += 1
        else:
            embeddings = encoder.encode(phrases)
            self.stats["encoded"] += 1
            self._check_embeddings(embeddings, encoder, phrases, source=f"{encoder!r}.encode")
            if self.directory is not None:
                self._write_disk(fingerprint, phrases, embeddings)
        self._memory[memory_key] = embeddings.clone()
        return embeddings

    # -- checks and disk I/O
    @staticmethod
    def _check_embeddings(emb: Any, encoder: PhraseEncoder, phrases: list[str], source: str) -> None:
        expected = (len(phrases), encoder.dim)
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != expected or emb.dtype != torch.float32:
            got = (tuple(emb.shape), emb.dtype) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"{source}: expected a float32 tensor of shape {expected}, got {got}")
        if not torch.isfinite(emb).all():
            raise ValueError(f"{source}: embeddings contain NaN or Inf")
        if len(phrases) and not torch.allclose(emb.norm(dim=-1), torch.ones(len(phrases)), atol=1e-3):
            raise ValueError(f"{source}: embeddings are not L2-normalised (row norms {emb.norm(dim=-1)[:4].tolist()}...)")

    def _read_disk(self, encoder: PhraseEncoder, fingerprint: dict, phrases: list[str]) -> torch.Tensor | None:
        tensor_path, sidecar_path = self.paths(encoder, phrases)
        key = tensor_path.stem
        if not sidecar_path.is_file():
            return None  # never written, or interrupted before the sidecar: recompute
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"phrase-embedding sidecar {sidecar_path} is not readable JSON: {exc}") from exc
        if not isinstance(sidecar, dict) or sidecar.get("format") != _CACHE_FORMAT:
            raise ValueError(f"phrase-embedding sidecar {sidecar_path}: not a {_CACHE_FORMAT} file "
                             f"(format={sidecar.get('format') if isinstance(sidecar, dict) else None!r})")
        if sidecar.get("encoder") != fingerprint:
            raise ValueError(f"phrase-embedding sidecar {sidecar_path} was written by another encoder:\n"
                             f"  file:      {canonical_json(sidecar.get('encoder'))}\n"
                             f"  requested: {canonical_json(fingerprint)}")
        if sidecar.get("phrases") != phrases:
            stored = sidecar.get("phrases") if isinstance(sidecar.get("phrases"), list) else []
            diff = next((i for i, (a, b) in enumerate(zip(stored, phrases)) if a != b), min(len(stored), len(phrases)))
            raise ValueError(f"phrase-embedding sidecar {sidecar_path} holds another vocabulary: "
                             f"{len(stored)} phrases vs {len(phrases)} requested, first difference at index {diff} "
                             f"({stored[diff] if diff < len(stored) else '<end>'!r} vs "
                             f"{phrases[diff] if diff < len(phrases) else '<end>'!r})")
        if sidecar.get("key") != key:
            raise ValueError(f"phrase-embedding sidecar {sidecar_path}: key {sidecar.get('key')!r} does not match "
                             f"its file name {key!r}")
        if not tensor_path.is_file():
            warnings.warn(f"phrase-embedding cache: {tensor_path} is missing next to its sidecar; recomputing",
                          RuntimeWarning, stacklevel=3)
            return None
        try:
            with safe_open(str(tensor_path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    raise ValueError(f"phrase-embedding file {tensor_path}: header key {meta.get('key')!r} does not "
                                     f"match its sidecar {key!r}")
                if _TENSOR_KEY not in f.keys():
                    raise ValueError(f"phrase-embedding file {tensor_path} has no tensor {_TENSOR_KEY!r}")
                emb = f.get_tensor(_TENSOR_KEY)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
            raise ValueError(f"phrase-embedding file {tensor_path} is not a readable safetensors file: {exc}") from exc
        self._check_embeddings(emb, encoder, phrases, source=f"phrase-embedding file {tensor_path}")
        return emb

    def _write_disk(self, fingerprint: dict, phrases: list[str], emb: torch.Tensor) -> None:
        key = hashlib.sha256(canonical_json({"encoder": fingerprint, "phrases": phrases}).encode()).hexdigest()
        self.directory.mkdir(parents=True, exist_ok=True)
        tensor_path = self.directory / f"{key}.safetensors"
        sidecar_path = self.directory / f"{key}.json"
        tmp = self.directory / f".{key}.{os.getpid()}.tmp"
        save_file({_TENSOR_KEY: emb.contiguous()}, str(tmp), metadata={"key": key, "format": _CACHE_FORMAT})
        os.replace(tmp, tensor_path)
        sidecar = {"format": _CACHE_FORMAT, "key": key, "encoder": fingerprint, "phrases": phrases,
                   "shape": list(emb.shape), "dtype": "float32"}
        tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True, ensure_ascii=False))
        os.replace(tmp, sidecar_path)
