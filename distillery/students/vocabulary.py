"""Prompt vocabularies of the open-vocabulary detector: one phrase per category (prompt index ==
contiguous label), from a dataset's categories or a vocabulary file; the COCO category names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .text import normalise_phrase

__all__ = ["COCO_CATEGORY_NAMES", "load_vocabulary", "prompts_from_categories"]

# The 80 COCO detection categories by their category id, as in instances_val2017.json
# (ids run 1..90 with ten gaps).
COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def _check_unique(phrases: Iterable[str], where: Sequence[str], source: str) -> None:
    """ValueError naming both places when two phrases are equal after :func:`normalise_phrase`."""
    seen: dict[str, str] = {}
    for phrase, place in zip(phrases, where):
        norm = normalise_phrase(phrase)
        if norm in seen:
            raise ValueError(f"{source}: duplicate phrase {phrase!r} at {place} (already at {seen[norm]}); "
                             f"phrases are compared lower-cased with collapsed whitespace")
        seen[norm] = place


def prompts_from_categories(categories: Sequence[Mapping[str, Any]], template: str | None = None) -> list[str]:
    """One prompt per category, in ascending category id (prompt index == contiguous label).

    The order matches :class:`distillery.platform.datasets.coco.CategoryMap`, so the class-head column p
    and the dataset's label p are the same category. The prompt is the category name itself (the
    default, as T-Rex2 and the COCO open-vocabulary evaluations use bare names), or
    ``template.format(name=name)`` when a template such as ``"a photo of a {name}"`` is given.
    """
    if template is not None and "{name}" not in template:
        raise ValueError(f"prompts_from_categories: template must contain '{{name}}', got {template!r}")
    checked = []
    for i, cat in enumerate(categories):
        if not isinstance(cat, Mapping) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise ValueError(f"categories[{i}] needs an integer 'id': {cat!r}")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"categories[{i}] (id {cat['id']}) needs a non-empty string 'name': {cat!r}")
        checked.append((cat["id"], " ".join(name.split()), i))
    if not checked:
        raise ValueError("prompts_from_categories: no categories")
    ids = [c[0] for c in checked]
    if len(set(ids)) != len(ids):
        dup = next(c for c in ids if ids.count(c) > 1)
        raise ValueError(f"prompts_from_categories: duplicate category id {dup}")
    checked.sort(key=lambda c: c[0])
    _check_unique([c[1] for c in checked], [f"categories[{c[2]}] (id {c[0]})" for c in checked],
                  "prompts_from_categories")
    return [template.format(name=name) if template else name for _, name, _ in checked]


def load_vocabulary(path: str | os.PathLike) -> list[str]:
    """Prompt phrases from a vocabulary file.

    Accepted forms:

    * text: one phrase per line; ``#`` starts a comment (to the end of the line); blank lines are
      ignored; surrounding whitespace is stripped and inner runs of whitespace collapsed;
    * a JSON list of strings;
    * a COCO-style JSON object with ``categories`` (``[{"id": ..., "name": ...}, ...]``), giving
      :func:`prompts_from_categories` (ascending id).

    JSON is recognised by the ``.json`` suffix or a first non-blank character ``[`` or ``{``.
    Errors name the file and the line or index: unreadable file, empty vocabulary, non-string
    entries, and duplicates (compared lower-cased, see :func:`normalise_phrase`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"vocabulary file {path} cannot be read as UTF-8 text: {exc}") from exc

    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"vocabulary file {path}: invalid JSON: {exc}") from exc
        if isinstance(doc, dict):
            if "categories" not in doc:
                raise ValueError(f"vocabulary file {path}: a JSON object needs a 'categories' list "
                                 f"(COCO style); keys are {sorted(doc)[:10]}")
            if not isinstance(doc["categories"], list) or not doc["categories"]:
                raise ValueError(f"vocabulary file {path}: 'categories' is empty or not a list")
            try:
                return prompts_from_categories(doc["categories"])
            except ValueError as exc:
                raise ValueError(f"vocabulary file {path}: {exc}") from exc
        if not isinstance(doc, list):
            raise ValueError(f"vocabulary file {path}: JSON must be a list of strings or an object with "
                             f"'categories', got {type(doc).__name__}")
        phrases = []
        for i, item in enumerate(doc):
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"vocabulary file {path}: entry [{i}] must be a non-empty string, got {item!r}")
            phrases.append(" ".join(item.split()))
        places = [f"{path} entry [{i}]" for i in range(len(phrases))]
    else:
        phrases, places = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            phrase = " ".join(line.split("#", 1)[0].split())
            if phrase:
                phrases.append(phrase)
                places.append(f"{path} line {lineno}")
    if not phrases:
        raise ValueError(f"vocabulary file {path} holds no phrases (blank lines and # comments only?)")
    _check_unique(phrases, places, f"vocabulary file {path}")
    return phrases
