"""The variables the Deployments set are the ones the services read (no silent typo)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from dispatcher.settings import DispatcherSettings
from infra import k8s
from infra.config import RUNTIME_PROCESS_MEMORY, DeployConfig
from runtime.settings import RuntimeSettings
from tests.infra.conftest import TEST_CONFIG, render_plain

CONFIG = DeployConfig.model_validate(TEST_CONFIG)
#: Set for a service that does not read it yet (runtime: pinning a pool to its default model).
NOT_YET_READ = {"SDEKS_DYNAMIC_MODELS"}


def _env(name: str) -> dict[str, str]:
    deployment = next(
        m
        for m in render_plain(CONFIG)
        if m["kind"] == "Deployment" and m["metadata"]["name"] == name
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def _settings_from(
    settings: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    for key in [k for k in os.environ if k.startswith("SDEKS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    known = {f"SDEKS_{field.upper()}" for field in settings.model_fields}
    unread = {k for k in env if k.startswith("SDEKS_")} - known - NOT_YET_READ
    assert not unread, f"{settings.__name__} reads no {sorted(unread)}"
    return settings()


def test_dispatcher_settings_parse_the_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(DispatcherSettings, _env(k8s.DISPATCHER), monkeypatch)
    assert settings.discovery == "kubernetes"
    assert settings.kubernetes_namespace == CONFIG.namespace
    assert settings.service_name("sdxl") == k8s.runtime_workload_name("sdxl")
    assert set(settings.queues) == set(CONFIG.runtime_names)
    assert settings.metrics_port == k8s.DISPATCHER_METRICS_PORT
    assert settings.log_format == "json"
    assert settings.grace_period_s >= max(r.task_time_limit_s for r in CONFIG.runtimes)


@pytest.mark.parametrize("runtime", CONFIG.runtime_names)
def test_runtime_settings_parse_the_deployment_env(
    runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings_from(
        RuntimeSettings, _env(k8s.runtime_workload_name(runtime)), monkeypatch
    )
    assert settings.runtime == runtime
    assert settings.device == "cuda"
    assert settings.models and settings.models.startswith("s3://")
    assert str(settings.cache_dir) == "/var/cache/sdeks"  # the Deployment's emptyDir
    # The model store's tiers fit the pod: disk within the emptyDir, RAM within the limit.
    assert settings.disk_cache_bytes < k8s.MODELS_VOLUME_GI * 2**30
    memory = next(r for r in CONFIG.runtimes if r.name == runtime).memory_bytes
    assert 0 < settings.ram_cache_bytes <= memory - RUNTIME_PROCESS_MEMORY
