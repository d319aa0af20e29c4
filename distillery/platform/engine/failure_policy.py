"""Ray Train's failure policy, except that deterministic errors are never retried.

A worker group that failed with a :class:`~distillery.platform.errors.DeterministicError` (in
any worker, anywhere in the exception's chain) is raised to the driver at once; every other
failure (a killed worker, a lost node, an outage) is decided by Ray's default policy and
counts against ``FailureConfig.max_failures`` as before. Installed by the job launcher
(``distillery.platform.distill.driver.fit_on_ray_train``).
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

from distillery.platform.errors import find_deterministic_error, user_error_message

__all__ = ["DeterministicAwareFailurePolicy", "create_failure_policy"]

log = logging.getLogger(__name__)


class DeterministicAwareFailurePolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        found = find_deterministic_error(training_failed_error)
        if found is not None:
            log.error("not retrying (no retry can fix this; max_failures untouched): %s", user_error_message(found))
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def create_failure_policy(failure_config) -> FailurePolicy:
    return DeterministicAwareFailurePolicy(failure_config)
