"""The variables the Deployments set are the ones the services read (no silent typo)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from dispatcher.settings import DispatcherSettings
from infra import k8s
from infra.config import RUNTIME_PROCESS_MEMORY, DeployConfig
from infra.workloads import render
from runtime.settings import RuntimeSettings
from tests.infra.conftest import TEST_CONFIG, render_plain

CONFIG = DeployConfig.model_validate(TEST_CONFIG)
#: Set for a service that does not read it yet (runtime: pinning a pool to its default model).
NOT_YET_READ = {"SDEKS_DYNAMIC_MODELS"}
#: What the kubelet would put in a variable read from a Secret (`valueFrom.secretKeyRef`).
SECRET_PLACEHOLDER = "secret-from-kubernetes"


def _deployment(name: str, config: DeployConfig = CONFIG) -> dict[str, Any]:
    return next(
        m
        for m in render_plain(config)
        if m["kind"] == "Deployment" and m["metadata"]["name"] == name
    )


def _env(name: str, config: DeployConfig = CONFIG) -> dict[str, str]:
    """The container's environment as the process sees it, Secrets as a placeholder."""
    (container,) = _deployment(name, config)["spec"]["template"]["spec"]["containers"]
    env = {}
    for entry in container["env"]:
        if "valueFrom" in entry:
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry
            env[entry["name"]] = SECRET_PLACEHOLDER
        else:
            env[entry["name"]] = entry["value"]
    return env


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
    assert settings.webhook_queue_url
    assert settings.webhook_secret.get_secret_value() == SECRET_PLACEHOLDER


def test_dispatcher_settings_parse_the_deployment_env_without_webhooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = CONFIG.model_copy(update={"webhooks": False})
    settings = _settings_from(DispatcherSettings, _env(k8s.DISPATCHER, config), monkeypatch)
    assert settings.webhook_queue_url is None
    assert settings.webhook_secret is None


def test_dispatcher_env_needs_the_webhooks_queue_exactly_when_webhooks_are_on() -> None:
    # GIVEN webhooks on but no queue THEN the render refuses (the dispatcher would not start)
    with pytest.raises(ValueError, match=r"webhook_queue_url must be given exactly"):
        render(
            config=CONFIG,
            dispatcher_image="d",
            runtime_image="r",
            common_env={},
            dispatcher_env={},
            queue_urls={r: "q" for r in CONFIG.runtime_names},
            webhook_queue_url=None,
            models_uri="s3://m",
            region="us-east-1",
        )


def test_dispatcher_pod_outlives_its_own_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the dispatcher's stop sequence (docs/dispatcher.md, "Stopping"): the last long
    # poll, plus the slack it gives a stuck one, then the grace period for running jobs
    settings = _settings_from(DispatcherSettings, _env(k8s.DISPATCHER), monkeypatch)
    stop_s = settings.receive_wait_s + 5 + settings.grace_period_s
    # THEN Kubernetes does not SIGKILL it before that ends
    grace = _deployment(k8s.DISPATCHER)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > stop_s


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
