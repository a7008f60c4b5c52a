"""Console configuration from `SDEKS_*` variables and flags."""

from __future__ import annotations

import pytest

from sdeks.console.app import config_from_env


def test_config_from_env_reads_resources_runtimes_and_pods():
    config = config_from_env(
        {
            "SDEKS_STACK": "prod",
            "SDEKS_TASK_TABLE": "tbl",
            "SDEKS_RUNTIMES": "sdruntime, xl",
            "SDEKS_PODS": '{"sdruntime": ["http://127.0.0.1:8080"]}',
            "SDEKS_POD_TOKEN": "secret",
        }
    )
    assert config.names.prefix == "prod" and config.task_table == "tbl"
    assert config.runtimes == ["sdruntime", "xl"]
    assert config.pods == {"sdruntime": ["http://127.0.0.1:8080"]}
    assert config.pod_token == "secret" and config.read_only is False
    assert config.output_bucket is None  # then from the stack names: prod-outputs


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SDEKS_PODS": "{not json"}, "not JSON"),
        ({"SDEKS_PODS": '{"sdruntime": "http://x"}'}, "must look like"),
        ({"SDEKS_RUNTIMES": "Bad_Name"}, "runtime name"),
    ],
)
def test_config_from_env_refuses_bad_values(env, words):
    with pytest.raises(ValueError, match=words):
        config_from_env(env)


def test_sdeks_console_refuses_bad_pods_json(capsys):
    from sdeks import cli

    assert cli.main(["console", "--pods", "[1]"]) == cli.EXIT_USAGE
    assert "must look like" in capsys.readouterr().out


def test_console_imports_no_service_dependency():
    """The console runs on the base install: no aiohttp, aiobotocore, torch or FastAPI."""
    import subprocess
    import sys

    code = (
        "import sys, sdeks.console.app, sdeks.console.server, sdeks.cli;"
        "heavy = {'aiohttp', 'aiobotocore', 'torch', 'fastapi', 'diffusers', 'moto'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
