"""How a cache stores a teacher grid (``cache.dtype``): :func:`encode_features` /
:func:`decode_features` for ``fp16``, ``int8`` (per-token symmetric) and ``pca``, the compressed
codec below: a PCA basis of the teacher's channels plus per-token quantisation of the projected
coefficients.

A (T, C) token-major grid is stored as ``codes`` (each token's d = ``dims`` coefficients on the
basis, quantised symmetrically per token to ``bits`` = 8 or 4 bits, two 4-bit codes per byte)
and one float16 ``scale`` per token (max|coefficient| / (2**(bits-1) - 1), the per-token scheme
of the ``int8`` storage dtype). Decoding gives back float (T, C) features::

    tokens ~= (codes * scale) @ basis + mean

so everything downstream of the cache (the DSI loss, grids carried through augmentation, cached
views) sees the same (C, H, W) float grids as with ``fp16``. Per token: d * bits / 8 + 2 bytes
against fp16's 2 * C (ViT-B/16, C = 768, d = 128, 4 bits: 66 against 1536 bytes, 0.043x).

The basis is fitted by the cache job on the teacher's features of the first ``fit_images``
images (sorted ids) before any shard is written: deterministic (moments summed in shard order,
eigenvectors with a fixed sign) and stored beside the manifest as a safetensors file (tensors
and a JSON header, never a pickle) whose sha256 the plan and the manifest record. A reader loads
it checked against that sha256.

Plain numpy (no torch, no Ray): the Ray Data tasks that write shards and the training ingest
import it, and so can a benchmark outside Ray (:func:`fit_codec`, :meth:`PcaCodec.encode`,
:meth:`PcaCodec.decode`, :meth:`PcaCodec.bytes_per_image`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from distillery.platform.cache.checks import CacheError

__all__ = ["CODEC_FIELDS", "CODEC_FILE", "CodecFileError", "PcaCodec", "StorageDtype", "TokenMoments",
           "decode_features", "dequantize_int8", "dequantize_per_token", "encode_features", "fit_codec",
           "load_verified_codec", "pack_codes", "quantize_int8", "quantize_per_token", "read_verified_codec",
           "tokens_of", "unpack_codes"]

CODEC_FILE = "codec-pca.safetensors"
SCALE_DTYPE = np.float16  # one scale per token: 2 bytes (the int8 dtype keeps float32 for fp16 parity)


StorageDtype = Literal["fp16", "int8", "pca"]   # how a cache stores its features
CODEC_FIELDS = ("dims", "bits", "fit_images")  # the codec settings a reader compares with its config


class CodecFileError(CacheError):
    """A codec file that is missing, damaged, or not the one a manifest records."""


# --------------------------------------------------------------------------- quantisation

def quantize_per_token(tokens: np.ndarray, bits: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token quantisation: (int8 codes in [-q, q], scale (T,)) with q = 2**(bits-1) - 1
    and x ~= codes * scale. The scale is rounded to ``scale_dtype`` before the codes are computed,
    so decoding with the stored scale is what was quantised."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    tokens = np.asarray(tokens, dtype=np.float32)
    scale = (np.abs(tokens).max(axis=-1) / qmax).astype(scale_dtype)
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"a token's largest value does not fit a {np.dtype(scale_dtype).name} scale "
                         f"(max |x| = {float(np.abs(tokens).max()):.4g})")
    scale = np.where(scale > 0, scale, 1).astype(scale_dtype)
    codes = np.clip(np.rint(tokens / scale.astype(np.float32)[..., None]), -qmax, qmax).astype(np.int8)
    return codes, scale


def dequantize_per_token(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale.astype(np.float32)[..., None]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(T, d) int8 codes -> (T, bytes) uint8: 8 bits as is, 4 bits two per byte (low nibble first,
    stored as code + 8; an odd d is padded with a zero code)."""
    if bits == 8:
        return codes.astype(np.int8).view(np.uint8)
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.full((*u.shape[:-1], 1), 8, np.uint8)], axis=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(packed: np.ndarray, bits: int, dims: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (T, bytes) uint8 -> (T, dims) int8."""
    if bits == 8:
        return packed.view(np.int8)[..., :dims]
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    out[..., 0::2] = (packed & 15).astype(np.int8) - 8
    out[..., 1::2] = (packed >> 4).astype(np.int8) - 8
    return out[..., :dims]


def tokens_of(features: np.ndarray) -> np.ndarray:
    """Token-major (T, C) float32 from (T, C) tokens or (N, C, H, W) grids."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 2:
        return features
    if features.ndim == 4:
        n, c = features.shape[:2]
        return features.reshape(n, c, -1).transpose(0, 2, 1).reshape(-1, c)
    raise ValueError(f"features must be (tokens, channels) or (images, channels, H, W), got shape {features.shape}")


# --------------------------------------------------------------------------- fitting

@dataclass(frozen=True)
class TokenMoments:
    """Count, mean and scatter (sum of centred outer products) of a set of tokens, in float64;
    moments of disjoint sets combine exactly (Chan et al.), so a sample streamed in shards gives
    the basis of the whole sample."""

    count: int
    mean: np.ndarray     # (C,)
    scatter: np.ndarray  # (C, C)

    @classmethod
    def of(cls, features: np.ndarray) -> "TokenMoments":
        x = tokens_of(features).astype(np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    def combine(self, other: "TokenMoments") -> "TokenMoments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return TokenMoments(n, mean, scatter)


def fit_codec(features_sample: np.ndarray | TokenMoments, dims: int, bits: int = 4) -> "PcaCodec":
    """The codec of the top ``dims`` principal components of a feature sample: (T, C) tokens,
    (N, C, H, W) grids, or their :class:`TokenMoments`. Deterministic: each component's sign
    makes its largest-magnitude entry positive."""
    moments = features_sample if isinstance(features_sample, TokenMoments) else TokenMoments.of(features_sample)
    channels = moments.mean.shape[0]
    if not 1 <= dims <= channels:
        raise ValueError(f"dims must be between 1 and the teacher's {channels} channels, got {dims}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if moments.count <= dims:
        raise ValueError(f"the fit sample has {moments.count} tokens: more than dims={dims} are needed")
    cov = moments.scatter / (moments.count - 1)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)  # ascending
    order = np.argsort(values)[::-1][:dims]
    basis = vectors[:, order].T  # (dims, C), orthonormal rows
    signs = np.sign(basis[np.arange(dims), np.abs(basis).argmax(axis=1)])
    basis = basis * np.where(signs == 0, 1, signs)[:, None]
    total = float(np.trace(cov))
    explained = float(values[order].sum() / total) if total > 0 else 1.0
    return PcaCodec(basis=basis.astype(np.float32), mean=moments.mean.astype(np.float32), bits=bits,
                    explained_variance=explained, fit_tokens=int(moments.count))


# --------------------------------------------------------------------------- the codec

class PcaCodec:
    """A fitted basis (d, C), the channel mean (C,) and the code width; see the module docstring."""

    method = "pca"

    def __init__(self, basis: np.ndarray, mean: np.ndarray, bits: int, explained_variance: float = float("nan"),
                 fit_tokens: int = 0):
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        if self.basis.ndim != 2 or self.mean.shape != (self.basis.shape[1],):
            raise ValueError(f"basis must be (dims, channels) and mean (channels,), got {self.basis.shape} "
                             f"and {self.mean.shape}")
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits = int(bits)
        self.explained_variance = float(explained_variance)
        self.fit_tokens = int(fit_tokens)

    @property
    def dims(self) -> int:
        return self.basis.shape[0]

    @property
    def channels(self) -> int:
        return self.basis.shape[1]

    @property
    def code_bytes(self) -> int:
        """Bytes of one token's codes."""
        return self.dims if self.bits == 8 else (self.dims + 1) // 2

    def bytes_per_image(self, tokens: int) -> int:
        """Stored bytes of one grid of ``tokens`` tokens (codes and scales; fp16: 2 * tokens * C)."""
        return int(tokens) * (self.code_bytes + np.dtype(SCALE_DTYPE).itemsize)

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, C) float tokens -> (packed codes (T, code_bytes) uint8, scales (T,) float16)."""
        tokens = np.asarray(tokens, dtype=np.float32)
        if tokens.ndim != 2 or tokens.shape[1] != self.channels:
            raise ValueError(f"tokens must be (T, {self.channels}), got {tokens.shape}")
        coeffs = (tokens - self.mean) @ self.basis.T
        codes, scale = quantize_per_token(coeffs, self.bits, SCALE_DTYPE)
        return pack_codes(codes, self.bits), scale

    def decode(self, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """(packed codes (T, code_bytes), scales (T,)) -> (T, C) float32 tokens."""
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1, self.code_bytes)
        coeffs = dequantize_per_token(unpack_codes(codes, self.bits, self.dims), np.asarray(scale).reshape(-1))
        return coeffs @ self.basis + self.mean

    def decode_bytes(self, codes: bytes, scale: bytes) -> np.ndarray:
        """:meth:`decode` of a cache row's ``features`` and ``scale`` bytes."""
        packed = np.frombuffer(codes, dtype=np.uint8)
        scales = np.frombuffer(scale, dtype=SCALE_DTYPE)
        if packed.size != scales.size * self.code_bytes:
            raise ValueError(f"{packed.size} code bytes for {scales.size} tokens: expected {self.code_bytes} per token "
                             f"(dims={self.dims}, bits={self.bits})")
        return self.decode(packed, scales)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "dims": self.dims, "bits": self.bits, "channels": self.channels}

    # ------------------------------------------------------------------- the file

    def to_bytes(self, metadata: dict[str, Any] | None = None) -> bytes:
        """A safetensors file: tensors ``basis`` and ``mean``; the settings (and ``metadata``,
        e.g. what the basis was fitted on) as strings in its header."""
        meta = {**self.describe(), "explained_variance": self.explained_variance, "fit_tokens": self.fit_tokens,
                **(metadata or {})}
        # Written here rather than by safetensors.numpy.save, whose header key order varies from
        # call to call: the same codec must give the same bytes (its sha256 is in the manifest).
        header: dict[str, Any] = {"__metadata__": {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
        offset, blobs = 0, []
        for name, array in (("basis", self.basis), ("mean", self.mean)):
            blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
            offset += len(blob)
            blobs.append(blob)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return struct.pack("<Q", len(text)) + text + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> tuple["PcaCodec", dict[str, Any]]:
        """(codec, its header metadata) from :meth:`to_bytes`'s file; errors name ``source``."""
        from safetensors.numpy import load

        try:
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + length])
            meta = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
            tensors = load(data)
            codec = cls(tensors["basis"], tensors["mean"], int(meta["bits"]),
                        meta.get("explained_variance", float("nan")), meta.get("fit_tokens", 0))
        except Exception as exc:  # noqa: BLE001 - struct, JSON, key errors and safetensors' own SafetensorError
            raise CodecFileError(f"{source} is not a PCA codec file ({type(exc).__name__}: {exc})") from None
        if meta.get("method") != "pca" or meta.get("dims") != codec.dims:
            raise CodecFileError(f"{source}: its header ({meta.get('method')!r}, dims {meta.get('dims')!r}) does "
                                 f"not describe its basis ({codec.basis.shape})")
        return codec, meta


@functools.lru_cache(maxsize=8)
def load_verified_codec(uri: str, sha256: str) -> PcaCodec:
    """:func:`read_verified_codec`, once per process and (file, sha256): the training ingest
    decodes every row with it."""
    return read_verified_codec(uri, sha256)


def read_verified_codec(uri: str, sha256: str) -> PcaCodec:
    """The codec file at ``uri``, checked against ``sha256`` (its manifest's record)."""
    from distillery.platform.io import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CodecFileError(f"codec file {uri} is missing: the cache's rows cannot be decoded without it") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CodecFileError(f"codec file {uri} is not the basis the cache was encoded with "
                             f"(sha256 {digest[:12]}..., manifest {sha256[:12]}...)")
    return PcaCodec.from_bytes(data, uri)[0]


# --------------------------------------------------------------------------- a grid's bytes, per storage dtype

def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: returns (int8 (T, C), float32 scale (T,)); x ~= q * scale."""
    return quantize_per_token(tokens, 8, np.float32)


dequantize_int8 = dequantize_per_token


def encode_features(grid: np.ndarray, dtype: StorageDtype, codec: PcaCodec | None = None) -> tuple[bytes, bytes | None]:
    """(C, H, W) float grid -> (feature bytes, scale bytes or None), token-major (``pca``: with its ``codec``)."""
    c = grid.shape[0]
    tokens = np.ascontiguousarray(np.asarray(grid, dtype=np.float32).reshape(c, -1).T)  # (H*W, C)
    if dtype == "fp16":
        return tokens.astype(np.float16).tobytes(), None
    if dtype == "int8":
        q, scale = quantize_int8(tokens)
        return q.tobytes(), scale.tobytes()
    if dtype == "pca":
        if codec is None:
            raise CacheError("pca storage needs its fitted codec")
        codes, scale = codec.encode(tokens)
        return codes.tobytes(), scale.tobytes()
    raise ValueError(f"unknown storage dtype {dtype!r} (expected 'fp16', 'int8' or 'pca')")


def decode_features(features: bytes, scale: bytes | None, dtype: StorageDtype,
                    grid: Sequence[int], codec: PcaCodec | None = None) -> np.ndarray:
    """Inverse of :func:`encode_features`: returns a float32 (C, H, W) array."""
    c, h, w = grid
    if dtype == "fp16":
        tokens = np.frombuffer(features, dtype=np.float16).astype(np.float32)
    elif dtype == "int8":
        if scale is None:
            raise CacheError("int8 features without their scale column")
        tokens = dequantize_int8(np.frombuffer(features, dtype=np.int8).reshape(h * w, c),
                                 np.frombuffer(scale, dtype=np.float32))
    elif dtype == "pca":
        if scale is None or codec is None:
            raise CacheError("pca features need their scale column and the cache's codec")
        tokens = codec.decode_bytes(features, scale)
    else:
        raise ValueError(f"unknown storage dtype {dtype!r}")
    return np.ascontiguousarray(tokens.reshape(h * w, c).T.reshape(c, h, w))
