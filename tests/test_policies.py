"""The small policies the executor and supervisor consult (spec lifecycle.md §7, README "Retries")."""

from __future__ import annotations

import json

import pytest

from studio_runner.errors import RequestExpired
from studio_runner.policies import Checkpoints, Deadline, Lifetime, Retries
from studio_runner.request import parse_request


def request(time_added=1000.0, lifetime=None, max_duration=None, save=None):
    config = {}
    if lifetime is not None:
        config["experimentLifetime"] = lifetime
    if save is not None:
        config["saveWorkspaceFrequency"] = save
    doc = {"experiment": {"key": "k", "filename": "x.py", "artifacts": {}, "time_added": time_added,
                          "max_duration": max_duration},
           "config": config}
    return parse_request(json.dumps(doc))


def test_lifetime_expired_only_after_its_end():
    req = request(lifetime="1h")
    Lifetime().check(req, now=1000.0 + 3599)
    with pytest.raises(RequestExpired, match="experimentLifetime ended 1s"):
        Lifetime().check(req, now=1000.0 + 3601)
    Lifetime().check(request(lifetime=None), now=10**12)  # no lifetime: never expires
    Lifetime().check(request(time_added=None, lifetime="1s"), now=10**12)


def test_deadline_is_the_earliest_limit_and_names_it():
    cap = Deadline(cap_seconds=96 * 3600)
    assert cap.at(request(), process_start=2000.0) == (2000.0 + 96 * 3600, "the runner's --max-lifetime")
    assert cap.at(request(max_duration="20m"), 2000.0) == (2000.0 + 1200, "max_duration")
    lifetime_first = cap.at(request(lifetime="30m", max_duration="1h"), 2000.0)
    assert lifetime_first == (1000.0 + 1800, "experimentLifetime")  # measured from time_added


def test_checkpoint_interval_has_a_floor_and_a_default():
    policy = Checkpoints(floor_seconds=60, default_seconds=600)
    assert policy.interval(request(save="1s")) == 60
    assert policy.interval(request(save="5m")) == 300
    assert policy.interval(request()) == 600


def test_retries_give_up_at_the_last_attempt():
    retries = Retries(max_attempts=3)
    assert [retries.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
