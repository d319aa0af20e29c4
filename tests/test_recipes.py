"""Every YAML recipe under configs/ validates against its job's config model."""

from pathlib import Path

import pytest

from distillery.platform.cache_job import CacheFeaturesConfig
from distillery.platform.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_for(path: Path):
    if path.name.startswith("cache_features"):
        return CacheFeaturesConfig
    if path.name.startswith(("distill", "rtdetrv4")):
        from distillery.platform.distill_config import DistillConfig

        return DistillConfig
    return None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_validates(path):
    model = model_for(path)
    if model is None:
        pytest.skip(f"{path.name} belongs to a job without a config test yet")
    load_config(model, path)
