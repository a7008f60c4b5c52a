"""Settings every service shares, read once at start-up from `SDEKS_*` variables.

Each service subclasses `ServiceSettings` with its own fields (see
`dispatcher.settings`, `runtime.settings`). AWS endpoint and region come from
the standard `AWS_ENDPOINT_URL` / `AWS_DEFAULT_REGION`, read by botocore.
"""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDEKS_", frozen=True, extra="ignore")

    #: SNS topic every callback is published to.
    callback_topic_arn: str
    #: Bucket that receives `{prefix}/{id}/...` outputs (and `rejected/`).
    output_bucket: str
    #: DynamoDB task table (status, idempotency); None disables it.
    task_table: str | None = None
    #: Signs every callback published (message attributes `sdeks_signature` and
    #: `sdeks_timestamp`, docs/contract.md); None publishes them unsigned.
    callback_secret: SecretStr | None = None
    #: The pod API's shared token: pods require it (`Authorization: Bearer ...`) on every
    #: route but /health, the dispatcher sends it. None: pods accept any caller (warned).
    pod_token: SecretStr | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
