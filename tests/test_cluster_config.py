"""cluster.yaml validates against Ray's own cluster-launcher schema."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    # What `ray up` does: fill in the provider's defaults, then validate against the schema.
    prepared = prepare_config(config)
    validate_config(prepared)  # raises on a schema violation
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and "gpu_worker" in types
    assert any("pip install -e" in c for c in prepared["setup_commands"])


def test_schema_check_is_real():
    import pytest
    from ray.autoscaler._private.util import validate_config

    from ray.autoscaler._private.util import prepare_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(config))
