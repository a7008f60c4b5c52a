"""The Kubernetes objects the app deploys, as plain dicts built by pure functions.

Nothing here touches CDK: values that are CloudFormation tokens at synth time
(queue URLs, image URIs, subnet ids) arrive as strings, so the same functions
render manifests for the stack and for offline validation
(`tests/infra/test_k8s.py` checks each against the cluster version's schemas).

Placement: GPU nodes carry the `GPU_TAINT`, so only pods that tolerate it —
the runtime pods — land there; runtime pods also select `GPU_POOL_LABEL` so
they never sit on a system node.
"""

from __future__ import annotations

from typing import Any

Manifest = dict[str, Any]

PART_OF = "sdeks"
DISPATCHER = "sdeks-dispatcher"
RUNTIME_PORT = 8080
DISPATCHER_METRICS_PORT = 9100
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "true", "effect": "NoSchedule"}
GPU_POOL_LABEL = ("sdeks.io/node-pool", "gpu")
GPU_NODE_POOL = "sdeks-gpu"
KEDA_AUTH = "sdeks-aws"
#: Keys of the internal Secret (`DeployConfig.internal_secret_name`): the pod API token
#: (pods require it, the dispatcher and the collector send it) and the callback signing secret.
POD_TOKEN_KEY = "pod-token"
CALLBACK_SECRET_KEY = "callback-secret"
#: Seconds a terminating pod stays in its Service's endpoints-draining window before
#: SIGTERM, so the dispatcher's EndpointSlice watch stops sending it jobs first.
PRESTOP_SLEEP_S = 15
#: Margin on top of the task time limit for upload and callback after the last step.
DRAIN_MARGIN_S = 60
#: The dispatcher's SQS long poll (`SDEKS_RECEIVE_WAIT_S`), set explicitly: on SIGTERM it
#: lets a poll in flight finish before its grace period starts.
DISPATCHER_RECEIVE_WAIT_S = 10
#: What a stopping dispatcher needs besides the poll and its grace period: the slack it
#: gives a stuck poll (dispatcher/service.py), releasing held leases, closing clients.
DISPATCHER_SHUTDOWN_MARGIN_S = 20
#: The model store's disk tier: an emptyDir on the GPU node's data volume (`gpu_node_class`).
MODELS_VOLUME_GI = 150
#: What the disk tier may fill, leaving room for partial downloads.
MODELS_DISK_CACHE_BYTES = (MODELS_VOLUME_GI - 10) * 2**30


def runtime_workload_name(runtime: str) -> str:
    """Deployment and headless Service name of a runtime (the dispatcher discovers pods by it)."""
    return f"sdeks-runtime-{runtime}"


def _labels(component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        **extra,
    }


def _env(
    env: dict[str, str], secrets: dict[str, tuple[str, str]] | None = None
) -> list[dict[str, Any]]:
    """Literal variables, plus `secrets` (variable -> (Secret name, key)) read by the kubelet."""
    entries: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    entries += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for k, (secret, key) in (secrets or {}).items()
    ]
    names = [e["name"] for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"env: {duplicates} given both as a value and from a Secret")
    return sorted(entries, key=lambda e: e["name"])


def _restricted_security_context() -> dict[str, Any]:
    # Pod Security "restricted" profile; images run as uid 10001 (see the Dockerfiles).
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


#: Public name: the collector's Deployment (infra.collector) follows the same profile.
restricted_security_context = _restricted_security_context


def grace_period_s(task_time_limit_s: int) -> int:
    """Termination grace: the preStop wait, a whole task, then upload and callback."""
    return PRESTOP_SLEEP_S + task_time_limit_s + DRAIN_MARGIN_S


def dispatcher_grace_period_s(*, receive_wait_s: int, drain_s: int) -> int:
    """Termination grace of the dispatcher: the last long poll, its own grace period
    (`SDEKS_GRACE_PERIOD_S` = `drain_s`), then cleanup. docs/dispatcher.md, "Stopping"."""
    return receive_wait_s + drain_s + DISPATCHER_SHUTDOWN_MARGIN_S


def namespace(name: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/part-of": PART_OF,
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    }


def service_account(*, name: str, namespace: str) -> Manifest:
    # Credentials come from EKS Pod Identity associations on (namespace, name): no annotation.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(name)},
    }


def dispatcher_rbac(*, namespace: str, service_account: str) -> list[Manifest]:
    """Read-only access to EndpointSlices in the namespace: how the dispatcher finds ready pods."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": DISPATCHER, "namespace": namespace, "labels": _labels(DISPATCHER)},
        "rules": [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": DISPATCHER, "namespace": namespace, "labels": _labels(DISPATCHER)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DISPATCHER},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
    return [role, binding]


def dispatcher_deployment(
    *,
    namespace: str,
    image: str,
    env: dict[str, str],
    replicas: int,
    service_account: str,
    termination_grace_s: int,
    secret_env: dict[str, tuple[str, str]] | None = None,
) -> Manifest:
    """The dispatcher: CPU only, spread over zones, kept off GPU nodes by their taint.

    `secret_env` maps variables to (Secret name, key): the pod does not start until
    that Secret exists (CreateContainerConfigError), and starts once it does.
    """
    labels = dispatcher_labels()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DISPATCHER, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(DISPATCHER_METRICS_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": service_account,
                    # It forwards jobs and holds their SQS leases until the pod answers:
                    # on SIGTERM it stops receiving and waits for those answers.
                    "terminationGracePeriodSeconds": termination_grace_s,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "topology.kubernetes.io/zone",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": dict(labels)},
                        }
                    ],
                    "containers": [
                        {
                            "name": "dispatcher",
                            "image": image,
                            "command": ["python", "-m", "dispatcher"],
                            "env": _env(env, secret_env),
                            "ports": [
                                {"name": "metrics", "containerPort": DISPATCHER_METRICS_PORT}
                            ],
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "512Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": "metrics"},
                                "periodSeconds": 10,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/health", "port": "metrics"},
                                "periodSeconds": 20,
                                "timeoutSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "securityContext": _restricted_security_context(),
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
                },
            },
        },
    }


def pod_disruption_budget(
    *, name: str, namespace: str, labels: dict[str, str], **budget: Any
) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"selector": {"matchLabels": dict(labels)}, **budget},
    }


def dispatcher_labels() -> dict[str, str]:
    return _labels(DISPATCHER)


def runtime_labels(runtime: str) -> dict[str, str]:
    return _labels("sdeks-runtime", **{"sdeks.io/runtime": runtime})


def runtime_deployment(
    *,
    namespace: str,
    runtime: str,
    image: str,
    env: dict[str, str],
    models_uri: str,
    instance_types: list[str],
    service_account: str,
    task_time_limit_s: int,
    cpu: str,
    memory: str,
    secret_env: dict[str, tuple[str, str]] | None = None,
) -> Manifest:
    """One runtime's GPU pods: one GPU each, drained on SIGTERM, scaled by KEDA.

    `replicas` is left out on purpose: KEDA's HPA owns it, and a re-apply of the
    manifest must not reset a scaled-out pool.
    """
    name = runtime_workload_name(runtime)
    labels = runtime_labels(runtime)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(RUNTIME_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": service_account,
                    "terminationGracePeriodSeconds": grace_period_s(task_time_limit_s),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
                    "nodeSelector": {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]},
                    "tolerations": [
                        {
                            "key": GPU_TAINT["key"],
                            "operator": "Exists",
                            "effect": GPU_TAINT["effect"],
                        }
                    ],
                    # Karpenter launches only what a pending pod accepts: this narrows the
                    # shared GPU NodePool to this runtime's instance types.
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "node.kubernetes.io/instance-type",
                                                "operator": "In",
                                                "values": list(instance_types),
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "runtime",
                            "image": image,
                            "command": [
                                "python",
                                "-m",
                                "runtime",
                                "--models",
                                models_uri,
                                "--port",
                                str(RUNTIME_PORT),
                                "--device",
                                "cuda",
                            ],
                            "env": _env(env, secret_env),
                            "ports": [{"name": "http", "containerPort": RUNTIME_PORT}],
                            "resources": {
                                "requests": {"cpu": cpu, "memory": memory, GPU_RESOURCE: "1"},
                                "limits": {"memory": memory, GPU_RESOURCE: "1"},
                            },
                            # CUDA init and the first model load can take minutes.
                            "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 120},
                            "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 3},
                            "livenessProbe": {
                                **probe,
                                "periodSeconds": 20,
                                "timeoutSeconds": 10,
                                "failureThreshold": 6,
                            },
                            # Leave the endpoints first, then SIGTERM: the pod finishes its
                            # running job within the grace period (it drains on SIGTERM).
                            "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
                            "securityContext": _restricted_security_context(),
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "models", "mountPath": "/var/cache/sdeks"},
                                {"name": "shm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
                        # The model store's disk tier (S3 -> disk -> RAM -> GPU).
                        {"name": "models", "emptyDir": {"sizeLimit": f"{MODELS_VOLUME_GI}Gi"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }


def runtime_service(*, namespace: str, runtime: str) -> Manifest:
    """Headless: no virtual IP; its EndpointSlices list the ready pods for the dispatcher."""
    labels = runtime_labels(runtime)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": runtime_workload_name(runtime),
            "namespace": namespace,
            "labels": dict(labels),
        },
        "spec": {
            "clusterIP": "None",
            "selector": dict(labels),
            "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http"}],
        },
    }


def keda_trigger_authentication(*, namespace: str) -> Manifest:
    # KEDA's operator reads queue attributes with its own Pod Identity role
    # (`identityOwner: keda`), so the runtime pods need no SQS permission for scaling.
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": KEDA_AUTH, "namespace": namespace},
        "spec": {"podIdentity": {"provider": "aws", "identityOwner": "keda"}},
    }


def runtime_scaled_object(
    *,
    namespace: str,
    runtime: str,
    queue_url: str,
    region: str,
    min_replicas: int,
    max_replicas: int,
    tasks_per_replica: int,
) -> Manifest:
    """Scale a runtime on its queue: visible plus in-flight messages, down to `min_replicas`.

    In-flight counts because the dispatcher holds a task's lease while a pod renders
    it: counting only visible messages would scale busy pods away.
    """
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": runtime_workload_name(runtime),
            "namespace": namespace,
            "labels": runtime_labels(runtime),
        },
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": runtime_workload_name(runtime),
            },
            "minReplicaCount": min_replicas,
            "maxReplicaCount": max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "aws-sqs-queue",
                    "authenticationRef": {"name": KEDA_AUTH, "kind": "TriggerAuthentication"},
                    "metadata": {
                        "queueURL": queue_url,
                        "awsRegion": region,
                        "queueLength": str(tasks_per_replica),
                        "activationQueueLength": "0",
                        "scaleOnInFlight": "true",
                        "scaleOnDelayed": "false",
                    },
                }
            ],
        },
    }


def gpu_node_class(
    *, node_role: str, subnet_ids: list[str], security_group_ids: list[str], tags: dict[str, str]
) -> Manifest:
    """EC2NodeClass for GPU nodes: Bottlerocket, whose NVIDIA variant ships the driver and
    the Kubernetes device plugin (no extra DaemonSet), with a large encrypted data volume
    for images and the model cache."""
    return {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": {"name": GPU_NODE_POOL},
        "spec": {
            "role": node_role,
            "amiSelectorTerms": [{"alias": "bottlerocket@latest"}],
            "subnetSelectorTerms": [{"id": s} for s in subnet_ids],
            "securityGroupSelectorTerms": [{"id": s} for s in security_group_ids],
            # Hop limit 1: pods cannot borrow the node's instance role through IMDS.
            "metadataOptions": {
                "httpEndpoint": "enabled",
                "httpProtocolIPv6": "disabled",
                "httpPutResponseHopLimit": 1,
                "httpTokens": "required",
            },
            "blockDeviceMappings": [
                {
                    "deviceName": "/dev/xvda",
                    "ebs": {
                        "volumeSize": "4Gi",
                        "volumeType": "gp3",
                        "encrypted": True,
                        "deleteOnTermination": True,
                    },
                },
                {
                    "deviceName": "/dev/xvdb",
                    "ebs": {
                        "volumeSize": "200Gi",
                        "volumeType": "gp3",
                        "iops": 3000,
                        "throughput": 250,
                        "encrypted": True,
                        "deleteOnTermination": True,
                    },
                },
            ],
            "tags": tags,
        },
    }


def gpu_node_pool(*, instance_types: list[str], gpu_limit: int, drain_s: int) -> Manifest:
    """The GPU NodePool: spot and on-demand, tainted, consolidated when idle or underused."""
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": GPU_NODE_POOL},
        "spec": {
            "template": {
                "metadata": {"labels": {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]}},
                "spec": {
                    "nodeClassRef": {
                        "group": "karpenter.k8s.aws",
                        "kind": "EC2NodeClass",
                        "name": GPU_NODE_POOL,
                    },
                    "requirements": [
                        {
                            "key": "node.kubernetes.io/instance-type",
                            "operator": "In",
                            "values": list(instance_types),
                        },
                        # With both allowed Karpenter prefers spot and falls back to on-demand.
                        {
                            "key": "karpenter.sh/capacity-type",
                            "operator": "In",
                            "values": ["spot", "on-demand"],
                        },
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                    ],
                    "taints": [dict(GPU_TAINT)],
                    "expireAfter": "720h",
                    # Upper bound on a node drain: pods get their full grace period first.
                    "terminationGracePeriod": f"{drain_s}s",
                },
            },
            "disruption": {
                "consolidationPolicy": "WhenEmptyOrUnderutilized",
                "consolidateAfter": "5m",
                "budgets": [{"nodes": "20%"}],
            },
            "limits": {GPU_RESOURCE: str(gpu_limit)},
        },
    }
