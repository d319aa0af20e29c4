"""Search spaces written in YAML, checked before a sweep starts, and turned into Ray Tune's.

A space maps dotted job-config keys to distributions::

    space:
      gam.rho:       {type: uniform, low: 0.002, high: 0.008}
      gam.delta:     {type: uniform, low: 0.0002, high: 0.0015}
      optim.lr:      {type: loguniform, low: 1.0e-4, high: 1.0e-3}
      moe.granularity: {type: choice, values: [1, 2, 4]}

Checks (all before any trial runs, each error naming the key): the space is not empty; every key
exists in the job's config and every value the distribution can produce is valid there (bounds
and every choice are put through the job's config validation, which also catches an expert
granularity that does not divide the FFN width); ``gam.delta`` can never reach ``gam.rho``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, model_validator
from ray import tune

from distillery.platform.config.sections import ConfigError, StrictModel, load_config

__all__ = ["ParamSpec", "SpaceError", "check_space", "representative_values", "to_tune_space",
           "trial_overrides"]


class SpaceError(ValueError):
    """A search space that cannot be swept (names the key)."""


class ParamSpec(StrictModel):
    """One dimension of a search space."""

    type: Literal["uniform", "loguniform", "quniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    q: float | None = Field(None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpec":
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type}: 'values' must be a non-empty list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{self.type}: takes 'values', not low/high")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type}: needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"{self.type}: low ({self.low}) must be below high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {self.low}")
            if self.type == "quniform" and self.q is None:
                raise ValueError("quniform: needs 'q'")
        return self


def representative_values(spec: ParamSpec) -> list[Any]:
    """Values that bound what the distribution can produce: every choice, or both ends."""
    if spec.type in ("choice", "grid"):
        return list(spec.values)
    if spec.type == "randint":  # Tune's randint excludes high
        return [int(spec.low), int(spec.high) - 1]
    return [spec.low, spec.high]


def _bounds(spec: ParamSpec) -> tuple[float, float]:
    values = representative_values(spec)
    return min(values), max(values)


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """Dotted ``key=value`` overrides (the job CLI's syntax) for one trial's sampled values."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in sorted(params.items())]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def check_space(space: Mapping[str, ParamSpec], job_model: type[StrictModel], base_config: str | None,
                base_overrides: list[str], fixed: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`SpaceError` naming the key if the space is empty or can produce a bad config.

    ``fixed`` are values the sweep sets for every trial (e.g. the calibrated ``gam.rho``).
    """
    if not space:
        raise SpaceError("search space is empty: give at least one key under sweep.space")
    fixed = dict(fixed or {})
    for key in space:
        if key in fixed:
            raise SpaceError(f"search space key {key!r} is also set by the sweep itself ({fixed[key]!r})")
    # gam.delta must stay below gam.rho for every sample: delta's top below rho's bottom.
    rho = _bounds(space["gam.rho"]) if "gam.rho" in space else None
    delta = _bounds(space["gam.delta"]) if "gam.delta" in space else None
    if rho is None and "gam.rho" in fixed:
        rho = (fixed["gam.rho"], fixed["gam.rho"])
    if delta is not None and rho is not None and delta[1] >= rho[0]:
        raise SpaceError(f"contradictory search space: gam.delta can reach {delta[1]} but gam.rho can be as low "
                         f"as {rho[0]}; delta must stay below rho in every trial")
    # Every key, at each representative value, through the job's own validation.
    for key, spec in space.items():
        for value in representative_values(spec):
            others = {k: representative_values(s)[0] for k, s in space.items() if k != key}
            params = {**fixed, **others, key: value}
            try:
                load_config(job_model, base_config, [*base_overrides, *trial_overrides(params)])
            except ConfigError as exc:
                raise SpaceError(f"search space key {key!r} value {value!r} gives an invalid job config:\n{exc}") \
                    from None


def to_tune_space(space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` for these dimensions (keys stay dotted)."""
    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.type == "uniform":
            out[key] = tune.uniform(s.low, s.high)
        elif s.type == "loguniform":
            out[key] = tune.loguniform(s.low, s.high)
        elif s.type == "quniform":
            out[key] = tune.quniform(s.low, s.high, s.q)
        elif s.type == "randint":
            out[key] = tune.randint(int(s.low), int(s.high))
        elif s.type == "choice":
            out[key] = tune.choice(list(s.values))
        else:
            out[key] = tune.grid_search(list(s.values))
    return out
