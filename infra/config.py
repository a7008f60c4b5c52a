"""What a deployment is made of: runtimes, sizes, versions — validated before any synth.

Read from `cdk.json` context key `sdeks` (an object), optionally overlaid by a
JSON or YAML file named in context `sdeks:config` (`-c sdeks:config=deploy.yaml`),
then by single keys given as `-c sdeks:<field>=<value>` on the command line.
Field names use camelCase aliases in files and context (`minReplicas`), like
the rest of `cdk.json`; snake_case is accepted too.

A bad value fails the synth with every problem listed, each with its path:

    sdeks config (cdk.json context "sdeks"): 1 problem
      runtimes.0.maxReplicas: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from sdeks.names import StackNames, check_runtime_name

CONTEXT_KEY = "sdeks"
CONTEXT_FILE_KEY = "sdeks:config"

#: Kubernetes versions this app's manifests are validated against (kubernetes-validate schemas)
#: and that both aws_eks_v2 and EKS offer.
KubernetesVersion = Literal["1.33", "1.34", "1.35", "1.36"]

# GPU families the GPU NodePool may launch (issue 6: g5/g6). Karpenter picks among
# the listed sizes; the pods' node affinity narrows it per runtime.
_GPU_INSTANCE_RE = r"^(g5|g6|g6e)\.[0-9]*x?large$"


#: Host memory a runtime pod needs besides its RAM model cache (Python, torch, CUDA context).
RUNTIME_PROCESS_MEMORY = 6 * 2**30


class ConfigError(ValueError):
    """The deployment configuration is invalid; the message lists every problem."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RuntimeConfig(_Model):
    """One runtime pool: a queue, a GPU Deployment and its autoscaling."""

    name: Annotated[str, AfterValidator(check_runtime_name)]
    #: Checkpoint used when a task names none (A1111 naming, e.g. `v1-5-pruned-emaonly.safetensors`).
    default_model: str = Field(min_length=1)
    #: Whether tasks may switch checkpoints on a pod (the model store loads on demand);
    #: false pins every pod of this runtime to `default_model`.
    dynamic_models: bool = True
    instance_types: list[Annotated[str, Field(pattern=_GPU_INSTANCE_RE)]] = Field(
        default_factory=lambda: ["g6.xlarge", "g5.xlarge"], min_length=1
    )
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=4, ge=1, le=100)
    #: Longest a single task may render; sizes the pods' termination grace period so a
    #: scale-in or node consolidation lets a running task finish.
    task_time_limit_s: int = Field(default=600, ge=30, le=3600)
    #: Queued (visible + in-flight) messages per replica that KEDA aims for.
    tasks_per_replica: int = Field(default=2, ge=1, le=100)
    cpu: str = Field(default="3", pattern=r"^([1-9][0-9]*|[1-9][0-9]*m)$")
    #: Pod memory (request = limit); the model store's RAM tier gets what the process
    #: itself does not need (`RUNTIME_PROCESS_MEMORY`).
    memory: str = Field(default="12Gi", pattern=r"^[1-9][0-9]*(Gi|Mi)$")

    @property
    def memory_bytes(self) -> int:
        number, unit = int(self.memory[:-2]), self.memory[-2:]
        return number * (2**30 if unit == "Gi" else 2**20)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> RuntimeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas "
                f"({self.max_replicas}) for runtime {self.name!r}"
            )
        if self.memory_bytes < RUNTIME_PROCESS_MEMORY + 2**30:
            raise ValueError(
                f"memory must be at least {RUNTIME_PROCESS_MEMORY // 2**30 + 1}Gi for runtime "
                f"{self.name!r} (torch, CUDA and the pipelines need "
                f"{RUNTIME_PROCESS_MEMORY // 2**30}Gi before any model is cached), got {self.memory}"
            )
        return self


class AlarmConfig(_Model):
    """Alarm thresholds (`alarms` in the deploy config); docs/operate.md has a runbook each."""

    #: Addresses subscribed to the alarm topic by email (each confirms once).
    emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(default_factory=list)
    #: Messages in any dead-letter queue at which its alarm fires.
    dlq_messages: int = Field(default=1, ge=1)
    #: Age of the oldest message in a runtime queue at which its alarm fires.
    oldest_message_age_s: int = Field(default=1800, ge=60, le=14 * 24 * 3600)
    #: Minutes a runtime may have visible tasks and no ready pod (GPU node start included).
    no_pods_minutes: int = Field(default=15, ge=2, le=1440)
    #: Failed share of terminal callbacks (pods and dispatcher), in percent, over the window.
    failed_callback_percent: float = Field(default=20.0, gt=0, le=100)
    #: Window of the failed-callback rate, and the least callbacks in it for the rate to count.
    failed_callback_minutes: int = Field(default=15, ge=5, le=1440)
    failed_callback_min_count: int = Field(default=5, ge=1)
    #: Unexpected dispatcher errors (`sdeks_dispatcher_errors_total`) per 5 minutes.
    dispatcher_errors: int = Field(default=1, ge=1)


class DeployConfig(_Model):
    """The whole deployment."""

    #: Prefix of every physical name (`sdeks.names.StackNames`); also the cluster name.
    prefix: str = Field(default="sdeks", pattern=r"^[a-z][a-z0-9-]{1,18}[a-z0-9]$")
    runtimes: list[RuntimeConfig] = Field(
        default_factory=lambda: [
            RuntimeConfig(name="sdruntime", default_model="v1-5-pruned-emaonly")
        ],
        min_length=1,
    )
    kubernetes_version: KubernetesVersion = "1.34"
    #: Helm chart versions: each must support `kubernetes_version` (see docs/deploy.md).
    karpenter_version: str = "1.8.1"
    keda_version: str = "2.18.0"
    system_instance_type: str = "m7i.large"
    system_nodes: int = Field(default=2, ge=2, le=10)
    #: NAT gateways for the private subnets: 1 is cheap, one per AZ survives an AZ outage.
    nat_gateways: int = Field(default=1, ge=1, le=3)
    #: CIDRs allowed to reach the public Kubernetes API endpoint.
    api_allowed_cidrs: list[str] = Field(default_factory=lambda: ["0.0.0.0/0"], min_length=1)
    #: IAM principals (role/user ARNs) given cluster-admin through EKS access entries.
    admin_principal_arns: list[str] = Field(default_factory=list)
    #: Import this existing bucket as the models bucket instead of creating one.
    models_bucket_name: str | None = None
    #: Extra buckets the dispatcher may read `s3://` image links from.
    extra_link_buckets: list[str] = Field(default_factory=list)
    #: Days before outputs expire (0 keeps them forever).
    output_expiry_days: int = Field(default=30, ge=0)
    #: Delete buckets (with their objects) and the table when the stack is destroyed.
    destroy_data_on_delete: bool = False
    dispatcher_replicas: int = Field(default=2, ge=1, le=20)
    #: Deliver task webhooks (`metadata.webhook`): a `webhooks` queue on the callback topic,
    #: consumed by the dispatcher, which then needs the HMAC secret below (docs/deploy.md).
    webhooks: bool = True
    #: Kubernetes Secret (in `namespace`) and key holding the webhook HMAC secret; the
    #: operator creates it, so the secret never passes through CloudFormation.
    webhook_secret_name: str = Field(
        default="sdeks-webhook", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
    )
    webhook_secret_key: str = Field(default="secret", pattern=r"^[-._a-zA-Z0-9]{1,253}$")
    namespace: str = Field(default="sdeks", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    #: Kubernetes Secret (in `namespace`) holding the pod API token (key `token`) and the
    #: callback signing secret (key `callback-secret`); the operator creates it
    #: (`InternalSecretCommand` output), so neither passes through CloudFormation.
    internal_secret_name: str = Field(
        default="sdeks-internal", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
    )
    alarms: AlarmConfig = Field(default_factory=AlarmConfig)
    #: The metrics collector (ADOT) image; any aws-otel-collector release with the
    #: prometheus receiver and the awsemf exporter.
    collector_image: str = "public.ecr.aws/aws-observability/aws-otel-collector:v0.45.1"
    #: Prebuilt image URIs. Unset: build `dispatcher/Dockerfile` and `runtime/Dockerfile`
    #: as CDK image assets (needs Docker at deploy time, not at synth).
    dispatcher_image: str | None = None
    runtime_image: str | None = None

    @model_validator(mode="after")
    def _unique_runtimes(self) -> DeployConfig:
        names = [r.name for r in self.runtimes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"runtime names must be unique, got duplicates {duplicates}")
        return self

    @property
    def names(self) -> StackNames:
        return StackNames(self.prefix)

    @property
    def runtime_names(self) -> list[str]:
        return [r.name for r in self.runtimes]

    @property
    def gpu_instance_types(self) -> list[str]:
        return sorted({t for r in self.runtimes for t in r.instance_types})


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"sdeks config file {str(path)!r} cannot be read: {exc}") from exc
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"sdeks config file {str(path)!r} must hold an object, got {data!r:.60}")
    return data


def _parse_scalar(value: Any) -> Any:
    """`-c key=value` arrives as a string: accept JSON there (`-c sdeks:systemNodes=3`)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def load_config(get: Callable[[str], Any], *, base_dir: Path | None = None) -> DeployConfig:
    """Build the config from CDK context (`get` = `app.node.try_get_context`).

    Order: the `sdeks` object, then the `sdeks:config` file, then `sdeks:<field>` keys.
    """
    data: dict[str, Any] = dict(get(CONTEXT_KEY) or {})
    source = f'cdk.json context "{CONTEXT_KEY}"'
    if file_name := get(CONTEXT_FILE_KEY):
        path = Path(file_name)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        data.update(_read_file(path))
        source += f" + {str(path)!r}"
    for name, field in DeployConfig.model_fields.items():
        for key in dict.fromkeys((field.alias or name, name)):
            value = get(f"{CONTEXT_KEY}:{key}")
            if value is not None:
                data[key] = _parse_scalar(value)
                source += f" + -c {CONTEXT_KEY}:{key}"
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            + (f" (got {err['input']!r:.60})" if err["type"] != "missing" else "")
            for err in exc.errors()
        ]
        raise ConfigError(
            f"sdeks config ({source}): {len(problems)} problem(s)\n" + "\n".join(problems)
        ) from None
