"""The deployment config: defaults, cdk.json, overrides, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.config import ConfigError, DeployConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _load(context: dict[str, Any], base_dir: Path | None = None) -> DeployConfig:
    return load_config(context.get, base_dir=base_dir)


def test_config_from_cdk_json_is_valid() -> None:
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    config = _load(context)
    assert config.runtime_names == ["sdruntime"]
    assert config.runtimes[0].min_replicas == 0
    assert config.kubernetes_version == "1.34"


def test_config_defaults_without_context() -> None:
    config = _load({})
    assert config.prefix == "sdeks"
    assert config.runtimes[0].instance_types == ["g6.xlarge", "g5.xlarge"]
    assert config.webhooks is True
    assert (config.webhook_secret_name, config.webhook_secret_key) == ("sdeks-webhook", "secret")


def test_config_webhooks_switch_and_secret_name() -> None:
    config = _load({"sdeks": {"webhookSecretName": "hooks.v2"}, "sdeks:webhooks": "false"})
    assert config.webhooks is False
    assert config.webhook_secret_name == "hooks.v2"
    with pytest.raises(ConfigError, match=r"webhookSecretName: String should match"):
        _load({"sdeks": {"webhookSecretName": "Bad_Name"}})


def test_config_error_names_the_field_and_value() -> None:
    # GIVEN a runtime that can never scale up
    context = {"sdeks": {"runtimes": [{"name": "sd", "defaultModel": "m", "maxReplicas": 0}]}}
    # THEN the error points at it
    with pytest.raises(
        ConfigError, match=r"runtimes\.0\.maxReplicas: .*greater than or equal to 1.*got 0"
    ):
        _load(context)


def test_config_rejects_min_above_max() -> None:
    context = {
        "sdeks": {
            "runtimes": [{"name": "sd", "defaultModel": "m", "minReplicas": 3, "maxReplicas": 2}]
        }
    }
    with pytest.raises(ConfigError, match=r"minReplicas \(3\) must not exceed maxReplicas \(2\)"):
        _load(context)


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"name": "Bad_Name", "defaultModel": "m"}, "runtime name must be"),
        ({"name": "sd", "defaultModel": "m", "instanceTypes": ["p4d.24xlarge"]}, "instanceTypes.0"),
        (
            {"name": "sd", "defaultModel": "m", "minReplica": 1},
            "minReplica: Extra inputs are not permitted",
        ),
        ({"name": "sd"}, "defaultModel: Field required"),
        ({"name": "sd", "defaultModel": "m", "memory": "6Gi"}, "memory must be at least 7Gi"),
        ({"name": "sd", "defaultModel": "m", "memory": "12GB"}, "memory: String should match"),
    ],
)
def test_config_rejects_bad_runtimes(runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load({"sdeks": {"runtimes": [runtime]}})


def test_config_rejects_duplicate_runtimes() -> None:
    runtime = {"name": "sd", "defaultModel": "m"}
    with pytest.raises(ConfigError, match=r"duplicates \['sd'\]"):
        _load({"sdeks": {"runtimes": [runtime, runtime]}})


def test_config_command_line_keys_override_the_object() -> None:
    # `-c sdeks:systemNodes=3` arrives as the string "3"
    config = _load({"sdeks": {"systemNodes": 2}, "sdeks:systemNodes": "3", "sdeks:prefix": "prod"})
    assert config.system_nodes == 3
    assert config.names.task_topic == "prod-tasks"


def test_config_file_overlays_the_context(tmp_path: Path) -> None:
    (tmp_path / "deploy.yaml").write_text(
        "runtimes:\n  - name: anime\n    defaultModel: anything-v5\n    maxReplicas: 8\n"
        "outputExpiryDays: 7\n"
    )
    config = _load({"sdeks": {"prefix": "team"}, "sdeks:config": "deploy.yaml"}, base_dir=tmp_path)
    assert config.prefix == "team"
    assert config.runtime_names == ["anime"]
    assert config.output_expiry_days == 7


def test_config_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        _load({"sdeks:config": "nope.yaml"}, base_dir=tmp_path)


def test_app_reports_a_bad_config_and_exits_2() -> None:
    # The CDK CLI hands `-c` values to the app through CDK_CONTEXT_JSON (read when jsii
    # starts, hence a fresh process); a config error stops before any synth.
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps({"sdeks:systemNodes": "1"})}
    done = subprocess.run(
        [sys.executable, "-m", "infra.app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "systemNodes: Input should be greater than or equal to 2 (got 1)" in done.stderr


def test_config_alarm_thresholds_default_and_override() -> None:
    # GIVEN no alarms key THEN the documented defaults apply
    alarms = _load({}).alarms
    assert (alarms.dlq_messages, alarms.oldest_message_age_s, alarms.no_pods_minutes) == (
        1,
        1800,
        15,
    )
    assert alarms.emails == []
    # GIVEN overrides in camelCase THEN they are read, and a bad one names its path
    config = _load({"sdeks": {"alarms": {"noPodsMinutes": 30, "emails": ["ops@example.com"]}}})
    assert config.alarms.no_pods_minutes == 30
    assert config.alarms.emails == ["ops@example.com"]
    with pytest.raises(ConfigError, match=r"alarms\.failedCallbackPercent: .*less than or equal"):
        _load({"sdeks": {"alarms": {"failedCallbackPercent": 150}}})
    with pytest.raises(ConfigError, match=r"alarms\.emails\.0"):
        _load({"sdeks": {"alarms": {"emails": ["not an address"]}}})


def test_cdk_json_spells_out_the_default_alarm_thresholds() -> None:
    # Operators tune thresholds in cdk.json: the values there are the defaults, in full.
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    listed = context["sdeks"]["alarms"]
    assert _load(context).alarms == _load({}).alarms
    assert set(listed) == {f.alias for f in type(_load({}).alarms).model_fields.values()}
