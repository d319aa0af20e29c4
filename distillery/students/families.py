"""Every student family, registered here: one line per family module (the module that builds its
:class:`StudentFamily` as ``FAMILY``).

:func:`~distillery.students.rtdetrv4.build_student`, the jobs' config check (``student.name``)
and :func:`~distillery.students.criterion.criterion_options` look a size up here, so a new family
is its own module (its sizes and builder; optionally its official loss settings) plus one line
below. The family modules are loaded on first use (they import this one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from torch import nn

__all__ = ["FAMILY_MODULES", "StudentFamily", "families", "family_of", "student_names"]

FAMILY_MODULES = (
    "distillery.students.rtdetrv4",
    "distillery.students.deimv2",
)


@dataclass(frozen=True)
class StudentFamily:
    """A detector family: its sizes and how one is built."""

    name: str                                    # "RT-DETRv4": error messages, identify
    specs: Mapping[str, Any]                     # size name -> its spec (``spec_from_overrides`` reads them)
    build: Callable[..., nn.Module]              # build(size name, **spec overrides) -> the student
    # build_criterion options of its official recipes, by size; a size not listed trains with
    # build_criterion's defaults (RT-DETRv4's losses).
    criterion_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    peft: bool = False                           # its ViT backbones take PEFT adapters (student.peft)


@cache
def families() -> dict[str, StudentFamily]:
    """Every registered family, by name, loaded on first use."""
    found: dict[str, StudentFamily] = {}
    sizes: dict[str, str] = {}
    for module in FAMILY_MODULES:
        family = importlib.import_module(module).FAMILY
        for size in family.specs:
            if size in sizes:
                raise RuntimeError(f"student {size!r} is registered by two families ({sizes[size]}, {family.name})")
            sizes[size] = family.name
        found[family.name] = family
    return found


def student_names() -> list[str]:
    """Every size ``build_student`` accepts."""
    return sorted(size for family in families().values() for size in family.specs)


def family_of(student_name: str) -> StudentFamily:
    """The family registering ``student_name``; a KeyError naming the known sizes otherwise."""
    for family in families().values():
        if student_name in family.specs:
            return family
    raise KeyError(f"unknown student {student_name!r}; expected one of {student_names()}")
