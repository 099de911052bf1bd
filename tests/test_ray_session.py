"""How steel starts or joins Ray (no Ray is started here: ray.init is replaced)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return calls


def test_local_session_gets_keras_env_cpus_and_the_quiet_hook(fake_ray):
    from steel.core import ray_session
    from steel.core.keras_env import ENV_VARS

    assert ray_session.ensure_ray(num_cpus=6) is True
    (kw,) = fake_ray
    assert kw["num_cpus"] == 6 and kw["include_dashboard"] is False
    env = kw["runtime_env"]
    assert env["worker_process_setup_hook"] == "steel.core.ray_session.quiet_worker_logs"
    assert all(env["env_vars"][k] == v for k, v in ENV_VARS.items())


def test_joining_a_cluster_adds_no_hook(fake_ray):
    from steel.core import ray_session

    ray_session.ensure_ray(address="ray://127.0.0.1:10001")
    (kw,) = fake_ray
    assert "num_cpus" not in kw and "worker_process_setup_hook" not in (kw["runtime_env"] or {})


def test_quiet_worker_logs_lowers_the_listed_loggers():
    import os

    import ray

    from steel.core import ray_session

    report = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    import ray.train.v2._internal.execution.context as context  # the logger is named after this file

    assert context.__file__ == report
    names = [*ray_session._QUIET_LOGGERS, report]
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET)
    ray_session.quiet_worker_logs()
    assert all(logging.getLogger(n).level >= logging.WARNING for n in names)
