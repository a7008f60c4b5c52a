"""What the deployed stack must guarantee, asserted on the synthesized template."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
from aws_cdk.assertions import Match

from infra import k8s
from sdeks.names import (
    MAX_RECEIVE_COUNT,
    VISIBILITY_TIMEOUT_S,
    WEBHOOK_VISIBILITY_TIMEOUT_S,
    StackNames,
    catch_all_filter_policy,
    runtime_filter_policy,
)
from sdeks.tasks import table_schema
from sdeks.webhooks import WEBHOOK_FILTER_POLICY
from tests.infra.conftest import Synth, ref

NAMES = StackNames("sdeks")
RUNTIMES = ["sdruntime", "sdxl"]


def _queue_id(synth: Synth, name: str) -> str:
    return synth.logical_id("AWS::SQS::Queue", QueueName=name)


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return policy["Properties"]["PolicyDocument"]["Statement"]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_stack_nag_acknowledgments_are_specific_and_explained(synth: Synth) -> None:
    # GIVEN the session app synthesized with AwsSolutionsChecks (the fixture raises on
    # any unacknowledged finding) THEN each acknowledgment names its finding and says why.
    acks: dict[str, str] = {}
    for construct in synth.stack.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY:
                for key, reason in entry.data.items():
                    finding = key.removeprefix("Annotation::")
                    if finding.startswith("AwsSolutions"):
                        acks[finding] = reason
    assert acks
    for finding, reason in acks.items():
        assert len(reason) >= 60, (finding, reason)
        # Wildcard and managed-policy findings are acknowledged one by one, never wholesale.
        assert finding not in ("AwsSolutions-IAM5", "AwsSolutions-IAM4"), finding
    rules = {finding.split("[")[0] for finding in acks}
    assert rules == {
        "AwsSolutions-IAM4",
        "AwsSolutions-IAM5",
        "AwsSolutions-L1",
        "AwsSolutions-SQS3",
    }


def test_subscriptions_filter_each_runtime_and_the_catch_all(synth: Synth) -> None:
    topic = synth.logical_id("AWS::SNS::Topic", TopicName=NAMES.task_topic)
    for runtime in RUNTIMES:
        synth.template.has_resource_properties(
            "AWS::SNS::Subscription",
            {
                "Protocol": "sqs",
                "TopicArn": {"Ref": topic},
                "Endpoint": {"Fn::GetAtt": [_queue_id(synth, NAMES.task_queue(runtime)), "Arn"]},
                "FilterPolicy": runtime_filter_policy(runtime),
            },
        )
    synth.template.has_resource_properties(
        "AWS::SNS::Subscription",
        {
            "Endpoint": {"Fn::GetAtt": [_queue_id(synth, NAMES.catch_all_queue), "Arn"]},
            "FilterPolicy": catch_all_filter_policy(RUNTIMES),
        },
    )
    # ... and one more on the callback topic: the webhooks queue
    synth.template.resource_count_is("AWS::SNS::Subscription", len(RUNTIMES) + 2)


def test_webhooks_queue_takes_terminal_callbacks_only(synth: Synth) -> None:
    # GIVEN the local stack's subscription (sdeks.resources): the callback topic, filtered
    # on the `status` message attribute
    callback = synth.logical_id("AWS::SNS::Topic", TopicName=NAMES.callback_topic)
    (subscription,) = [
        s["Properties"]
        for s in synth.resources("AWS::SNS::Subscription").values()
        if s["Properties"]["TopicArn"] == {"Ref": callback}
    ]
    # THEN the deployed one is the same
    assert subscription == {
        "Protocol": "sqs",
        "TopicArn": {"Ref": callback},
        "Endpoint": {"Fn::GetAtt": [_queue_id(synth, NAMES.webhook_queue), "Arn"]},
        "FilterPolicy": WEBHOOK_FILTER_POLICY,
    }
    # Only SNS on behalf of the callback topic may send to the queue.
    (policy,) = [
        p["Properties"]
        for p in synth.resources("AWS::SQS::QueuePolicy").values()
        if p["Properties"]["Queues"] == [{"Ref": _queue_id(synth, NAMES.webhook_queue)}]
    ]
    (allow,) = [st for st in policy["PolicyDocument"]["Statement"] if st["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "sns.amazonaws.com"}
    assert allow["Action"] == "sqs:SendMessage"
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Ref": callback}}}


def test_queues_redrive_to_their_dlq(synth: Synth) -> None:
    pairs = [(NAMES.task_queue(r), NAMES.task_dlq(r), VISIBILITY_TIMEOUT_S) for r in RUNTIMES]
    pairs.append((NAMES.catch_all_queue, NAMES.catch_all_dlq, VISIBILITY_TIMEOUT_S))
    pairs.append((NAMES.webhook_queue, NAMES.webhook_dlq, WEBHOOK_VISIBILITY_TIMEOUT_S))
    for queue, dlq, visibility in pairs:
        synth.template.has_resource_properties(
            "AWS::SQS::Queue",
            {
                "QueueName": queue,
                "VisibilityTimeout": visibility,
                "MessageRetentionPeriod": 14 * 24 * 3600,
                "RedrivePolicy": {
                    "deadLetterTargetArn": {"Fn::GetAtt": [_queue_id(synth, dlq), "Arn"]},
                    "maxReceiveCount": MAX_RECEIVE_COUNT,
                },
            },
        )
        synth.template.has_resource_properties(
            "AWS::SQS::Queue",
            {"QueueName": dlq, "MessageRetentionPeriod": 14 * 24 * 3600},
        )


def test_topics_and_queues_are_kms_encrypted_and_sns_may_use_the_queue_key(synth: Synth) -> None:
    for topic in synth.resources("AWS::SNS::Topic").values():
        assert "Fn::GetAtt" in topic["Properties"]["KmsMasterKeyId"], topic
    for queue in synth.resources("AWS::SQS::Queue").values():
        props = queue["Properties"]
        # Karpenter's interruption queue takes EventBridge events: SQS-managed SSE there.
        assert "KmsMasterKeyId" in props or props.get("SqsManagedSseEnabled") is True, props
    queue_names = [
        *(NAMES.task_queue(r) for r in RUNTIMES),
        NAMES.catch_all_queue,
        NAMES.webhook_queue,
        NAMES.webhook_dlq,
    ]
    queue_keys = {
        json.dumps(
            synth.resources("AWS::SQS::Queue")[_queue_id(synth, name)]["Properties"][
                "KmsMasterKeyId"
            ]
        )
        for name in queue_names
    }
    assert len(queue_keys) == 1
    (queue_key,) = queue_keys
    key = synth.resources("AWS::KMS::Key")[json.loads(queue_key)["Fn::GetAtt"][0]]["Properties"]
    assert key["EnableKeyRotation"] is True
    # SNS may encrypt into the queues on behalf of each topic that delivers there, no other.
    sns_statements = [
        st
        for st in key["KeyPolicy"]["Statement"]
        if st.get("Principal") == {"Service": "sns.amazonaws.com"}
    ]
    assert all(
        st["Effect"] == "Allow" and set(st["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey"}
        for st in sns_statements
    )
    topics = [
        {"Ref": synth.logical_id("AWS::SNS::Topic", TopicName=name)}
        for name in (NAMES.task_topic, NAMES.callback_topic)
    ]
    assert sorted((st["Condition"] for st in sns_statements), key=json.dumps) == sorted(
        ({"ArnEquals": {"aws:SourceArn": topic}} for topic in topics), key=json.dumps
    )


def test_buckets_block_public_access_encrypt_and_expire_outputs(synth: Synth) -> None:
    buckets = synth.resources("AWS::S3::Bucket")
    assert len(buckets) == 3  # outputs, models, access logs
    for bucket in buckets.values():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    synth.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketName": {"Fn::Join": ["", Match.array_with([f"{NAMES.output_bucket}-"])]},
            "LifecycleConfiguration": {
                "Rules": Match.array_with(
                    [Match.object_like({"ExpirationInDays": 30, "Status": "Enabled"})]
                )
            },
            "LoggingConfiguration": Match.object_like({"LogFilePrefix": "outputs/"}),
        },
    )


def test_tls_is_enforced_on_buckets_topics_and_queues(synth: Synth) -> None:
    deny_plain = Match.object_like(
        {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
    )
    for type_, count in (
        ("AWS::S3::BucketPolicy", 3),
        ("AWS::SNS::TopicPolicy", 2),
        ("AWS::SQS::QueuePolicy", 6),
    ):
        policies = synth.resources(type_)
        assert len(policies) >= count, type_
        synth.template.all_resources_properties(
            type_, {"PolicyDocument": {"Statement": Match.array_with([deny_plain])}}
        )
    # Every queue, DLQs included, is covered by some policy that denies plain HTTP.
    covered = {
        json.dumps(q)
        for p in synth.resources("AWS::SQS::QueuePolicy").values()
        for q in p["Properties"]["Queues"]
    }
    assert len(covered) == len(synth.resources("AWS::SQS::Queue"))


def test_task_table_is_on_demand_with_ttl_and_pitr(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "TableName": NAMES.task_table,
            "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
            "AttributeDefinitions": Match.array_with(
                [{"AttributeName": "id", "AttributeType": "S"}]
            ),
            "BillingMode": "PAY_PER_REQUEST",
            "TimeToLiveSpecification": {"AttributeName": "expires_at", "Enabled": True},
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": {"SSEEnabled": True},
        },
    )


def test_task_table_matches_the_local_stack_schema(synth: Synth) -> None:
    # GIVEN the schema the local stack creates (sdeks.tasks.table_schema)
    schema = table_schema(NAMES.task_table)
    (table,) = synth.resources("AWS::DynamoDB::Table").values()
    props = table["Properties"]
    # THEN the deployed table has the same keys, attribute types and indexes
    assert props["KeySchema"] == schema["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(
        schema["AttributeDefinitions"], key=str
    )
    deployed = {i["IndexName"]: i for i in props["GlobalSecondaryIndexes"]}
    for index in schema["GlobalSecondaryIndexes"]:
        assert deployed[index["IndexName"]]["KeySchema"] == index["KeySchema"]
        assert deployed[index["IndexName"]]["Projection"] == index["Projection"]


def test_cluster_version_logging_and_system_nodes(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::EKS::Cluster",
        {
            "Name": "sdeks",
            "Version": synth.config.kubernetes_version,
            "Logging": {
                "ClusterLogging": {
                    "EnabledTypes": Match.array_with(
                        [
                            {"Type": t}
                            for t in (
                                "api",
                                "audit",
                                "authenticator",
                                "controllerManager",
                                "scheduler",
                            )
                        ]
                    )
                }
            },
            "EncryptionConfig": Match.any_value(),
        },
    )
    synth.template.has_resource_properties(
        "AWS::EKS::Nodegroup",
        {"ScalingConfig": {"MinSize": 2, "DesiredSize": 2, "MaxSize": 4}, "Taints": Match.absent()},
    )
    synth.template.has_resource_properties(
        "AWS::EKS::Addon", {"AddonName": "eks-pod-identity-agent"}
    )


def test_pod_identity_associations_for_every_workload(synth: Synth) -> None:
    expected = {
        ("sdeks", "sdeks-dispatcher"),
        ("sdeks", "sdeks-runtime"),
        ("keda", "keda-operator"),
        ("kube-system", "karpenter"),
        ("sdeks", "sdeks-metrics"),
    }
    found = {
        (a["Properties"]["Namespace"], a["Properties"]["ServiceAccount"])
        for a in synth.resources("AWS::EKS::PodIdentityAssociation").values()
    }
    assert found == expected


def _pod_role_policies(synth: Synth, service_account: str) -> list[dict[str, Any]]:
    association = next(
        a
        for a in synth.resources("AWS::EKS::PodIdentityAssociation").values()
        if a["Properties"]["ServiceAccount"] == service_account
    )
    role_id = association["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    return [
        p
        for p in synth.resources("AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
    ]


def test_data_plane_policies_have_no_wildcard_resource_or_action(synth: Synth) -> None:
    for service_account in ("sdeks-dispatcher", "sdeks-runtime", "keda-operator"):
        policies = _pod_role_policies(synth, service_account)
        assert policies, service_account
        for policy in policies:
            for statement in _statements(policy):
                assert "*" not in _as_list(statement["Resource"]), (service_account, statement)
                for action in _as_list(statement["Action"]):
                    assert action.split(":")[1] != "*", (service_account, statement)


def _allowed(synth: Synth, service_account: str) -> list[tuple[str, str]]:
    """(action, resource as JSON) pairs a pod role is allowed."""
    return [
        (action, json.dumps(resource))
        for policy in _pod_role_policies(synth, service_account)
        for st in _statements(policy)
        for action in _as_list(st["Action"])
        for resource in _as_list(st["Resource"])
    ]


def test_dispatcher_may_use_exactly_the_task_queues_and_callback_topic(synth: Synth) -> None:
    allowed = _allowed(synth, "sdeks-dispatcher")
    queue_names = [NAMES.task_queue(r) for r in RUNTIMES] + [NAMES.catch_all_queue]
    for name in queue_names:
        arn = json.dumps({"Fn::GetAtt": [_queue_id(synth, name), "Arn"]})
        for action in (
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
            "sqs:SendMessage",
        ):
            assert (action, arn) in allowed, (action, name)
    # The webhooks queue: consumed, never sent to (only the callback topic sends there).
    webhooks = json.dumps({"Fn::GetAtt": [_queue_id(synth, NAMES.webhook_queue), "Arn"]})
    assert {a for a, r in allowed if r == webhooks} == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
    }
    sqs_resources = {r for a, r in allowed if a.startswith("sqs:")}
    assert len(sqs_resources) == len(queue_names) + 1  # no DLQ, no other queue
    # Receiving from the KMS-encrypted queues needs the queue key.
    queue_key = json.dumps(
        synth.resources("AWS::SQS::Queue")[_queue_id(synth, NAMES.webhook_queue)]["Properties"][
            "KmsMasterKeyId"
        ]
    )
    assert ("kms:Decrypt", queue_key) in allowed
    callback = json.dumps(
        {"Ref": synth.logical_id("AWS::SNS::Topic", TopicName=NAMES.callback_topic)}
    )
    assert {r for a, r in allowed if a == "sns:Publish"} == {callback}
    put = [r for a, r in allowed if a == "s3:PutObject"]
    assert len(put) == 1 and "/rejected/*" in put[0]
    assert any("public-inputs/*" in r for a, r in allowed if a == "s3:GetObject")


def test_runtime_pods_read_models_and_write_outputs_only(synth: Synth) -> None:
    allowed = _allowed(synth, "sdeks-runtime")
    actions = {a for a, _ in allowed}
    assert not any(a.startswith("sqs:") for a in actions)
    assert {"s3:GetObject", "s3:ListBucket", "s3:PutObject", "sns:Publish"} <= actions
    assert not any(a in actions for a in ("s3:DeleteObject", "s3:PutBucketPolicy"))


def test_keda_reads_only_the_runtime_queue_attributes(synth: Synth) -> None:
    allowed = _allowed(synth, "keda-operator")
    expected = {
        (
            "sqs:GetQueueAttributes",
            json.dumps({"Fn::GetAtt": [_queue_id(synth, NAMES.task_queue(r)), "Arn"]}),
        )
        for r in RUNTIMES
    }
    assert set(allowed) == expected


def test_keda_scaled_objects_watch_their_own_queue(synth: Synth) -> None:
    for runtime in RUNTIMES:
        scaled = synth.manifest("ScaledObject", k8s.runtime_workload_name(runtime))
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] == k8s.runtime_workload_name(runtime)
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "aws-sqs-queue"
        assert trigger["metadata"]["queueURL"] == ref(_queue_id(synth, NAMES.task_queue(runtime)))
        assert trigger["metadata"]["scaleOnInFlight"] == "true"
        assert trigger["authenticationRef"]["name"] == k8s.KEDA_AUTH
    assert synth.manifest("ScaledObject", "sdeks-runtime-sdruntime")["spec"]["minReplicaCount"] == 0
    assert synth.manifest("ScaledObject", "sdeks-runtime-sdxl")["spec"]["minReplicaCount"] == 1
    auth = synth.manifest("TriggerAuthentication", k8s.KEDA_AUTH)
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "keda"}


def test_gpu_nodes_are_tainted_and_only_runtime_pods_tolerate_them(synth: Synth) -> None:
    pool = synth.manifest("NodePool", k8s.GPU_NODE_POOL)["spec"]
    assert pool["template"]["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
    ]
    requirements = {r["key"]: r["values"] for r in pool["template"]["spec"]["requirements"]}
    assert requirements["karpenter.sh/capacity-type"] == ["spot", "on-demand"]
    assert set(requirements["node.kubernetes.io/instance-type"]) == {
        "g5.xlarge",
        "g6.xlarge",
        "g6e.xlarge",
    }
    assert all(
        t.split(".")[0] in ("g5", "g6", "g6e")
        for t in requirements["node.kubernetes.io/instance-type"]
    )
    assert pool["disruption"]["consolidationPolicy"] == "WhenEmptyOrUnderutilized"
    assert pool["limits"] == {"nvidia.com/gpu": "7"}  # 4 + 3 max replicas, one GPU each

    for runtime in RUNTIMES:
        pod = synth.manifest("Deployment", k8s.runtime_workload_name(runtime))["spec"]["template"][
            "spec"
        ]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert pod["nodeSelector"] == {"sdeks.io/node-pool": "gpu"}
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    dispatcher = synth.manifest("Deployment", k8s.DISPATCHER)["spec"]["template"]["spec"]
    assert "tolerations" not in dispatcher


def test_runtime_pods_outlive_a_task_on_termination(synth: Synth) -> None:
    for runtime in synth.config.runtimes:
        pod = synth.manifest("Deployment", k8s.runtime_workload_name(runtime.name))["spec"][
            "template"
        ]["spec"]
        assert (
            pod["terminationGracePeriodSeconds"] > runtime.task_time_limit_s + k8s.PRESTOP_SLEEP_S
        )
        assert (
            pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == k8s.PRESTOP_SLEEP_S
        )
        budget = synth.manifest("PodDisruptionBudget", k8s.runtime_workload_name(runtime.name))
        assert budget["spec"]["maxUnavailable"] == 1
        service = synth.manifest("Service", k8s.runtime_workload_name(runtime.name))
        assert service["spec"]["clusterIP"] == "None"


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    """name -> literal value, or the `valueFrom` object of a variable read from a Secret."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container["env"]}


def test_dispatcher_env_names_the_deployed_resources(synth: Synth) -> None:
    deployment = synth.manifest("Deployment", k8s.DISPATCHER)
    assert deployment["spec"]["replicas"] == 2
    env = _env(deployment)
    assert json.loads(env["SDEKS_QUEUES"]) == {
        r: ref(_queue_id(synth, NAMES.task_queue(r))) for r in RUNTIMES
    }
    assert env["SDEKS_CATCH_ALL_QUEUE_URL"] == ref(_queue_id(synth, NAMES.catch_all_queue))
    assert json.loads(env["SDEKS_KUBERNETES_SERVICES"]) == {
        r: k8s.runtime_workload_name(r) for r in RUNTIMES
    }
    assert env["SDEKS_DISCOVERY"] == "kubernetes"
    assert env["SDEKS_KUBERNETES_NAMESPACE"] == "sdeks"
    assert env["SDEKS_METRICS_PORT"] == "9100"
    assert env["SDEKS_LOG_FORMAT"] == "json"
    assert env["SDEKS_CALLBACK_TOPIC_ARN"] == ref(
        synth.logical_id("AWS::SNS::Topic", TopicName=NAMES.callback_topic)
    )
    assert env["SDEKS_TASK_TABLE"] == ref(
        synth.logical_id("AWS::DynamoDB::Table", TableName=NAMES.task_table)
    )
    allow = json.loads(env["SDEKS_S3_ALLOW_BUCKETS"])
    assert len(allow) == 3 and allow[-1] == "public-inputs"
    assert env["SDEKS_WEBHOOK_QUEUE_URL"] == ref(_queue_id(synth, NAMES.webhook_queue))
    # The HMAC secret never passes through CloudFormation: the kubelet reads it.
    assert env["SDEKS_WEBHOOK_SECRET"] == {
        "secretKeyRef": {"name": "sdeks-webhook", "key": "secret"}
    }


def test_dispatcher_pod_outlives_its_stop_sequence(synth: Synth) -> None:
    deployment = synth.manifest("Deployment", k8s.DISPATCHER)
    env = _env(deployment)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    longest_task_s = max(r.task_time_limit_s for r in synth.config.runtimes)
    # The last long poll, then the grace period for running jobs, which covers a whole task.
    assert int(env["SDEKS_GRACE_PERIOD_S"]) > longest_task_s
    assert grace > int(env["SDEKS_RECEIVE_WAIT_S"]) + int(env["SDEKS_GRACE_PERIOD_S"])


def test_runtime_env_and_command_point_at_the_models_bucket(synth: Synth) -> None:
    deployment = synth.manifest("Deployment", "sdeks-runtime-sdxl")
    env = _env(deployment)
    assert env["SDEKS_RUNTIME"] == "sdxl"
    assert env["SDEKS_DEFAULT_MODEL"] == "sd_xl_base_1.0"
    assert env["SDEKS_DEVICE"] == "cuda"
    assert env["SDEKS_MODELS"].startswith("s3://")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "runtime"]
    assert command[command.index("--models") + 1] == env["SDEKS_MODELS"]
    assert "replicas" not in deployment["spec"]  # KEDA owns it


def test_helm_charts_install_pinned_karpenter_and_keda(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "Custom::AWSCDK-EKS-HelmChart",
        {
            "Chart": "karpenter",
            "Version": synth.config.karpenter_version,
            "Namespace": "kube-system",
        },
    )
    synth.template.has_resource_properties(
        "Custom::AWSCDK-EKS-HelmChart",
        {"Chart": "keda", "Version": synth.config.keda_version, "Namespace": "keda"},
    )


def test_outputs_tell_the_user_what_was_deployed(synth: Synth) -> None:
    outputs = synth.raw["Outputs"]
    for key in (
        "TaskTopicArn",
        "CallbackTopicArn",
        "OutputBucketName",
        "ModelsBucketName",
        "TaskTableName",
        "ClusterName",
        "ClientPolicyArn",
        "KubeconfigCommand",
        "PublishFirstTaskCommand",
        "WebhookSecretCommand",
    ):
        assert key in outputs, key
    secret_command = outputs["WebhookSecretCommand"]["Value"]
    assert secret_command.startswith("kubectl -n sdeks create secret generic sdeks-webhook ")
    assert "--from-literal=secret=" in secret_command
    command = json.dumps(outputs["PublishFirstTaskCommand"]["Value"])
    assert "aws sns publish" in command and "sdruntime" in command
