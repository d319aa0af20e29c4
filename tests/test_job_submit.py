"""Where a submitted job's outputs go, and what its MLflow params show.

`ray job submit` of jobs/distill.py itself, to a real `ray start --head` cluster with token
authentication on, is tests/test_readme_day.py's: it checks that a client without the token is
turned away, the job's progress lines and summary, its checkpoint and its FINISHED MLflow run."""

import pytest


def test_relative_paths_in_rays_temporary_working_dir_are_refused(tmp_path, monkeypatch):
    from distillery.platform.config.sections import ConfigError, absolute_uri

    ephemeral = tmp_path / "ray" / "session_2026-01-01_00-00-00_1_1" / "runtime_resources" / \
        "working_dir_files" / "_ray_pkg_0123abcd"
    ephemeral.mkdir(parents=True)
    monkeypatch.chdir(ephemeral)
    monkeypatch.delenv("DISTILLERY_HOME", raising=False)
    with pytest.raises(ConfigError) as err:
        absolute_uri("runs")
    first = str(err.value).splitlines()[0]
    assert str(ephemeral / "runs") in first and "DISTILLERY_HOME" in first and "Ray deletes" in first
    # Absolute paths and URIs are where the user said; DISTILLERY_HOME is the base of relative ones.
    assert absolute_uri(str(tmp_path / "out")) == str(tmp_path / "out")
    assert absolute_uri("s3://bucket/runs") == "s3://bucket/runs"
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    assert absolute_uri("runs/x") == str(tmp_path / "home" / "runs" / "x")


def test_relative_paths_elsewhere_resolve_against_the_current_directory(tmp_path, monkeypatch):
    from distillery.platform.config.sections import absolute_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLERY_HOME", raising=False)
    assert absolute_uri("runs") == str(tmp_path / "runs")


def test_tracking_params_mask_secrets_by_name_and_in_uris():
    from distillery.platform.config.sections import StrictModel, flatten_config

    class Tracking(StrictModel):
        tracking_uri: str = "http://alice:hunter2@mlflow.internal:5000"
        api_token: str = "tok-123"
        tokenizer: str = "bert"

    class Job(StrictModel):
        tracking: Tracking = Tracking()

    params = flatten_config(Job())
    assert params["tracking.tracking_uri"] == "http://**********@mlflow.internal:5000"
    assert params["tracking.api_token"] == "**********"
    assert params["tracking.tokenizer"] == "bert"
    assert "hunter2" not in str(params) and "tok-123" not in str(params)
