"""Open-vocabulary real-time DETR: our RT-DETRv4 parts with a region-text class head (Dynamic-DINO's base).

Dynamic-DINO (arXiv 2507.17436) MoE-tunes a dense open-vocabulary detector (Grounding DINO 1.5
Edge). This module builds our dense base from the student parts that already exist: the HGNetv2
backbone, the hybrid encoder (AIFI + CCFF) and the D-FINE decoder (:mod:`.rtdetrv4`). Only the
classification changes, following T-Rex2's late-fusion design (:mod:`.text`):

* every class head of the decoder (``enc_score_head`` used for query selection, and
  ``dec_score_head[i]`` of every layer) becomes a :class:`~.text.RegionTextHead`: the query is
  projected and L2-normalised, dotted with the L2-normalised phrase embeddings of the prompt
  vocabulary, scaled by a learned temperature and shifted by a learned bias. The output has one
  column per prompt phrase (no background column), so the DEIM loss (MAL over sigmoid scores,
  :mod:`.criterion`) is computed over the prompt vocabulary unchanged:
  ``build_criterion(num_classes=len(vocabulary))``;
* the denoising queries' label embedding (an ``nn.Embedding(num_classes + 1, hidden)`` in the
  closed-set decoder) becomes a linear map of the label's phrase embedding, with a zero vector for
  the padding label, so denoising does not tie the model to a fixed class count either.

Text meets the image only there: the backbone, encoder, query content and boxes never see it.
The vocabulary is an input (a non-persistent buffer the caller can swap), not a parameter: the
same weights run with any list of phrases (:meth:`OpenVocabDetector.set_vocabulary`, or
``model(images, text=...)`` for one call). Note that query selection ranks memory tokens by their
best score over the *current* vocabulary (as Grounding DINO's language-guided query selection
does), so a different vocabulary may also select different queries; a permutation of the same
phrases only permutes the score columns.

How the heads see the vocabulary: the decoder calls its score heads with the query features
only (``head(output)``). Each head here holds a reference to a small :class:`PromptBank` shared
by the detector, which ``OpenVocabDetector.forward`` fills with the phrase embeddings for the
duration of the call. That keeps the D-FINE decoder unchanged (and with it every RT-DETRv4 test).

MoE-tuning: :func:`moe_tune_decoder` replaces the FFN of every decoder layer by Dynamic-DINO's
fine-grained experts (:func:`.moe.replace_decoder_ffns`); freshly done, the whole detector's
outputs equal the dense detector's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .criterion import build_criterion
from .detector import normalise_overrides
from .moe import MoEFFN, moe_parameter_counts, replace_decoder_ffns
from .rtdetrv4 import STUDENT_SPECS, RTDETRv4, StudentSpec, build_from_spec
from .phrase_cache import PhraseEmbeddingCache
from .text import PhraseEncoder, RegionTextHead, default_phrase_encoder

__all__ = [
    "DFINE_FFN_PARTS",
    "OPEN_VOCAB_OPTIONS",
    "OpenVocabDetector",
    "PromptBank",
    "PromptLabelEmbedding",
    "PromptScoreHead",
    "build_open_vocab",
    "build_open_vocab_criterion",
    "moe_layer_names",
    "moe_tune_decoder",
]

#: Attribute names of the inline FFN of a D-FINE decoder layer (``linear2(dropout3(act(linear1(x))))``).
DFINE_FFN_PARTS = ("linear1", "activation", "dropout3", "linear2")

#: Options of the open-vocabulary head, accepted by :func:`build_open_vocab` beside the StudentSpec fields.
OPEN_VOCAB_OPTIONS = {
    # None: the queries are projected straight into the (frozen) phrase-embedding space;
    # an int: the phrase embeddings get a learnable Linear(text_dim, text_proj_dim) adapter too.
    "text_proj_dim": None,
    "init_logit_scale": 1 / 0.07,   # CLIP's initial temperature
    "prior_prob": 0.01,             # initial score of every (query, phrase): the DETR focal prior
}
# Fields of StudentSpec the open-vocabulary model sets itself.
_FIXED_FIELDS = {"num_classes", "dsi", "teacher_dim"}


class PromptBank:
    """The phrase embeddings of the current call, shared by the heads of one detector (not a module)."""

    def __init__(self) -> None:
        self.text: torch.Tensor | None = None

    def get(self, who: str) -> torch.Tensor:
        if self.text is None:
            raise RuntimeError(f"{who} runs inside OpenVocabDetector.forward only (no vocabulary is set outside it)")
        return self.text


class PromptScoreHead(nn.Module):
    """A decoder class head over the current vocabulary: ``(B, Q, hidden) -> (B, Q, P)``."""

    def __init__(self, head: RegionTextHead, bank: PromptBank):
        super().__init__()
        self.head = head
        # A plain attribute (not a submodule): every head of a detector shares the same bank,
        # and deepcopy keeps that sharing within the copy.
        self.bank = bank

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.head(queries, self.bank.get("PromptScoreHead"))


class PromptLabelEmbedding(nn.Module):
    """Denoising label embedding from phrases: label ``p < P`` -> ``W t_p + b``; label ``P`` (padding) -> 0.

    Replaces the closed-set ``nn.Embedding(num_classes + 1, hidden, padding_idx=num_classes)``,
    whose padding row is zero as well.
    """

    def __init__(self, text_dim: int, hidden_dim: int, bank: PromptBank):
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden_dim)
        self.hidden_dim = hidden_dim
        self.bank = bank

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        text = self.bank.get("PromptLabelEmbedding")
        table = self.proj(text.to(self.proj.weight.dtype))
        table = torch.cat([table, table.new_zeros(1, self.hidden_dim)], dim=0)
        return F.embedding(labels, table)


class OpenVocabDetector(RTDETRv4):
    """RT-DETRv4 parts with region-text classification over a swappable prompt vocabulary.

    ``model(images)`` (eval) gives ``pred_logits`` of shape (B, Q, P), P = number of phrases of the
    current vocabulary (``model.phrases``, embeddings in the buffer ``model.text_embeddings``), and
    ``pred_boxes``; train mode gives the same dict as :class:`~.rtdetrv4.RTDETRv4`, every logit
    tensor over the P phrases. ``model(images, targets, text=(P', dim))`` uses another vocabulary
    for one call; target labels index the vocabulary in use.
    """

    def __init__(self, backbone, encoder, decoder, bank: PromptBank, phrases: Sequence[str],
                 text_embeddings: torch.Tensor, eval_spatial_size=(640, 640), spec: StudentSpec | None = None,
                 options: dict[str, Any] | None = None, name: str | None = None):
        super().__init__(backbone, encoder, decoder, dsi=None, eval_spatial_size=eval_spatial_size, spec=spec)
        self.bank = bank
        self.text_dim = int(text_embeddings.shape[-1])
        self.options = dict(options or {})
        self.name = name
        # Not persistent: a checkpoint holds the weights, which fit any vocabulary.
        self.register_buffer("text_embeddings", torch.empty(0, self.text_dim), persistent=False)
        self.phrases: list[str] = []
        self.set_vocabulary(phrases, text_embeddings)

    def _check_text(self, text: torch.Tensor, who: str) -> None:
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[-1] != self.text_dim \
                or text.shape[0] < 1:
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"{who}: phrase embeddings must be (P >= 1, {self.text_dim}), got {got}")

    def set_vocabulary(self, phrases: Sequence[str], text_embeddings: torch.Tensor) -> None:
        """Use ``phrases`` (P names) with their embeddings ``(P, text_dim)`` from now on."""
        phrases = list(phrases)
        self._check_text(text_embeddings, "OpenVocabDetector.set_vocabulary")
        if len(phrases) != text_embeddings.shape[0]:
            raise ValueError(f"OpenVocabDetector.set_vocabulary: {len(phrases)} phrases but "
                             f"{text_embeddings.shape[0]} embeddings")
        ref = self.text_embeddings
        self.text_embeddings = text_embeddings.detach().to(device=ref.device, dtype=ref.dtype).clone()
        self.phrases = phrases
        # The decoder draws noised denoising labels from [0, num_classes) and pads with num_classes.
        self.decoder.num_classes = len(phrases)

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None,
                text: torch.Tensor | None = None) -> dict:
        if text is None:
            text = self.text_embeddings
        else:
            self._check_text(text, "OpenVocabDetector.forward(text=...)")
            text = text.to(self.text_embeddings.device)
        saved = self.decoder.num_classes
        self.decoder.num_classes = int(text.shape[0])
        self.bank.text = text
        try:
            return super().forward(images, targets)
        finally:
            self.bank.text = None
            self.decoder.num_classes = saved

    def num_inference_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> dict[str, int]:
        """``{"total", "active"}`` parameters (equal for the dense model; see :func:`.moe.moe_parameter_counts`)."""
        return moe_parameter_counts(self)

    def build_options(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture with :func:`build_open_vocab` (JSON-safe)."""
        spec = dataclasses.asdict(self.spec) if self.spec is not None else {}
        base = dataclasses.asdict(STUDENT_SPECS[self.name]) if self.name in STUDENT_SPECS else {}
        out = {k: v for k, v in spec.items() if k not in _FIXED_FIELDS and base.get(k) != v}
        out.update(self.options)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def build_open_vocab(name: str, phrases: Sequence[str] | None = None, *,
                     phrase_embeddings: torch.Tensor | None = None, encoder: PhraseEncoder | None = None,
                     cache: PhraseEmbeddingCache | None = None, **overrides) -> OpenVocabDetector:
    """An open-vocabulary detector on the parts of RT-DETRv4 student ``name`` (``rtdetrv4_s|m|l|x|tiny``).

    Vocabulary: ``phrases`` (category names / prompts) and either their ``phrase_embeddings``
    (P, dim), or an ``encoder`` (default :func:`~.text.default_phrase_encoder` ``("auto")``:
    all-MiniLM-L6-v2 when installed) through ``cache`` (default: a fresh in-memory
    :class:`~.phrase_cache.PhraseEmbeddingCache`). ``phrase_embeddings`` without ``phrases`` names the
    phrases ``prompt_0 ...``.

    ``overrides``: any :class:`~.rtdetrv4.StudentSpec` field except ``num_classes``/``dsi``/
    ``teacher_dim`` (set by the vocabulary, no DSI projector), plus :data:`OPEN_VOCAB_OPTIONS`.
    """
    if name not in STUDENT_SPECS:
        raise KeyError(f"build_open_vocab: unknown student {name!r}; expected one of {sorted(STUDENT_SPECS)}")
    fixed = sorted(_FIXED_FIELDS & set(overrides))
    if fixed:
        raise TypeError(f"build_open_vocab({name!r}): {fixed} are set by the open-vocabulary model "
                        "(the vocabulary gives the class count; there is no DSI projector)")
    spec_fields = {f.name for f in dataclasses.fields(StudentSpec)}
    unknown = sorted(set(overrides) - spec_fields - set(OPEN_VOCAB_OPTIONS))
    if unknown:
        raise TypeError(f"build_open_vocab({name!r}): unknown option(s) {unknown}; known: "
                        f"{sorted((spec_fields - _FIXED_FIELDS) | set(OPEN_VOCAB_OPTIONS))}")
    options = {k: overrides.pop(k, default) for k, default in OPEN_VOCAB_OPTIONS.items()}

    if phrase_embeddings is None:
        if phrases is None:
            raise ValueError("build_open_vocab: pass phrases (and optionally an encoder) or phrase_embeddings")
        encoder = encoder if encoder is not None else default_phrase_encoder("auto")
        phrase_embeddings = (cache if cache is not None else PhraseEmbeddingCache()).get(encoder, list(phrases))
    elif phrases is None:
        phrases = [f"prompt_{i}" for i in range(phrase_embeddings.shape[0])]
    phrases = list(phrases)
    if phrase_embeddings.dim() != 2 or phrase_embeddings.shape[0] != len(phrases) or not phrases:
        raise ValueError(f"build_open_vocab: phrase_embeddings must be ({len(phrases)}, dim) for {len(phrases)} "
                         f"phrases (at least one), got {tuple(phrase_embeddings.shape)}")
    text_dim = int(phrase_embeddings.shape[1])

    spec = dataclasses.replace(STUDENT_SPECS[name], num_classes=len(phrases), dsi=False, teacher_dim=None,
                               **normalise_overrides(overrides))
    dense = build_from_spec(spec)
    decoder = dense.decoder

    bank = PromptBank()

    def text_head() -> PromptScoreHead:
        head = RegionTextHead(decoder.hidden_dim, text_dim, options["text_proj_dim"],
                              init_logit_scale=options["init_logit_scale"], prior_prob=options["prior_prob"])
        # Temperature and bias as shape-(1,) parameters (they broadcast the same way): DeepSpeed
        # broadcasts parameters as byte views at start-up, which a 0-dim tensor does not allow.
        head.logit_scale = nn.Parameter(head.logit_scale.detach().reshape(1))
        head.bias = nn.Parameter(head.bias.detach().reshape(1))
        return PromptScoreHead(head, bank)

    decoder.enc_score_head = text_head()
    decoder.dec_score_head = nn.ModuleList([text_head() for _ in range(decoder.num_layers)])
    if decoder.denoising_class_embed is not None:
        decoder.denoising_class_embed = PromptLabelEmbedding(text_dim, decoder.hidden_dim, bank)
    return OpenVocabDetector(dense.backbone, dense.encoder, decoder, bank, phrases, phrase_embeddings,
                             spec.eval_spatial_size, spec, options, name)


def build_open_vocab_criterion(model: OpenVocabDetector, **overrides):
    """The DEIM criterion over the model's current vocabulary (``num_classes = len(model.phrases)``)."""
    return build_criterion(num_classes=len(model.phrases), **overrides)


def moe_tune_decoder(model: RTDETRv4, copies: int, granularity: int, **moe_options) -> list[str]:
    """Dynamic-DINO's decomposition of every decoder FFN of ``model`` (in place).

    Each D-FINE decoder layer's FFN becomes an :class:`~.moe.MoEFFN` of ``copies * granularity``
    experts with top-``granularity`` routing, initialised so that the model's outputs are unchanged
    (only the decoder's FFNs, as in the paper; the encoder's AIFI FFN stays dense). ``moe_options``:
    ``capacity_factor``, ``aux_loss_weight``, ``record_routing``. Returns the replaced layers'
    names (``decoder.layers.<i>``).
    """
    names = replace_decoder_ffns(model.decoder.layers, copies, granularity, inline_parts=DFINE_FFN_PARTS,
                                 **moe_options)
    return [f"decoder.layers.{n}" for n in names]


def moe_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the :class:`~.moe.MoEFFN` modules of ``model``, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, MoEFFN)]
