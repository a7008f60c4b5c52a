"""The one stack: builds each concern's construct and wires grants between them."""

from __future__ import annotations

import json

from aws_cdk import Aws, CfnOutput, Stack
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra import collector, k8s, nag, netpol
from infra.autoscaling import Karpenter, Keda
from infra.cluster import Cluster
from infra.config import DeployConfig
from infra.images import Images
from infra.messaging import Messaging
from infra.monitoring import Monitoring
from infra.state import TaskState
from infra.storage import Storage
from infra.workloads import Workloads
from sdeks.names import CLI_QUEUE_PREFIX, REJECTED_PREFIX, RUNTIME_ATTRIBUTE


class SdeksStack(Stack):
    def __init__(
        self, scope: Construct, id: str, *, config: DeployConfig, **kwargs: object
    ) -> None:
        super().__init__(scope, id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        names = config.names

        storage = Storage(
            self,
            "Storage",
            names=names,
            models_bucket_name=config.models_bucket_name,
            output_expiry_days=config.output_expiry_days,
            destroy_data_on_delete=config.destroy_data_on_delete,
        )
        messaging = Messaging(
            self, "Messaging", names=names, runtimes=config.runtime_names, webhooks=config.webhooks
        )
        state = TaskState(
            self, "State", names=names, destroy_data_on_delete=config.destroy_data_on_delete
        )
        cluster = Cluster(
            self,
            "Cluster",
            name=names.prefix,
            kubernetes_version=config.kubernetes_version,
            system_instance_type=config.system_instance_type,
            system_nodes=config.system_nodes,
            nat_gateways=config.nat_gateways,
            api_allowed_cidrs=config.api_allowed_cidrs,
            admin_principal_arns=config.admin_principal_arns,
        )
        longest_task_s = max(r.task_time_limit_s for r in config.runtimes)
        karpenter = Karpenter(
            self,
            "Karpenter",
            cluster=cluster,
            version=config.karpenter_version,
            gpu_instance_types=config.gpu_instance_types,
            gpu_limit=sum(r.max_replicas for r in config.runtimes),
            # Pods drain within their grace period; the node waits a little longer.
            drain_s=k8s.grace_period_s(longest_task_s) + 300,
        )
        keda = Keda(self, "Keda", cluster=cluster, version=config.keda_version)
        images = Images(
            self,
            "Images",
            dispatcher_image=config.dispatcher_image,
            runtime_image=config.runtime_image,
        )

        queues = messaging.runtime_queues
        link_buckets = [
            storage.models_bucket.bucket_name,
            storage.output_bucket.bucket_name,
            *config.extra_link_buckets,
        ]
        models_uri = f"s3://{storage.models_bucket.bucket_name}"
        workloads = Workloads(
            self,
            "Workloads",
            cluster=cluster,
            config=config,
            dispatcher_image=images.dispatcher_uri,
            runtime_image=images.runtime_uri,
            common_env={
                "SDEKS_CALLBACK_TOPIC_ARN": messaging.callback_topic.topic_arn,
                "SDEKS_OUTPUT_BUCKET": storage.output_bucket.bucket_name,
                "SDEKS_TASK_TABLE": state.table.table_name,
                "SDEKS_LOG_FORMAT": "json",
                "AWS_REGION": Aws.REGION,
            },
            dispatcher_env={
                "SDEKS_QUEUES": json.dumps({r: q.queue.queue_url for r, q in queues.items()}),
                "SDEKS_CATCH_ALL_QUEUE_URL": messaging.catch_all.queue.queue_url,
                "SDEKS_S3_ALLOW_BUCKETS": json.dumps(link_buckets),
            },
            queue_urls={r: q.queue.queue_url for r, q in queues.items()},
            webhook_queue_url=messaging.webhooks.queue.queue_url if messaging.webhooks else None,
            models_uri=models_uri,
        )
        # Pods in the namespace must not start before their Pod Identity associations
        # (they would get no credentials); KEDA objects need the KEDA CRDs.
        workloads.objects.node.add_dependency(
            workloads.dispatcher_role, workloads.runtime_role, keda.chart, karpenter.gpu_pool
        )

        dlqs = {r: q.dlq for r, q in queues.items()}
        dlqs["catch-all"] = messaging.catch_all.dlq
        if messaging.webhooks:
            dlqs["webhooks"] = messaging.webhooks.dlq
        monitoring = Monitoring(
            self,
            "Monitoring",
            prefix=names.prefix,
            thresholds=config.alarms,
            runtime_queues=queues,
            dlqs=dlqs,
            topic_key=messaging.topic_key,
        )
        # The metrics collector (ADOT) and the NetworkPolicy in front of the runtime pods.
        collector_role = cluster.pod_identity_role(
            self, "CollectorRole", namespace=config.namespace, service_account=collector.COLLECTOR
        )
        monitoring.log_group.grant_write(collector_role)
        collector_role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["logs:DescribeLogStreams", "logs:CreateLogGroup"],
                resources=[monitoring.log_group.log_group_arn],
            )
        )
        observed = cluster.cluster.add_manifest(
            "SdeksMetrics",
            *collector.manifests(
                namespace=config.namespace,
                image=config.collector_image,
                metrics_namespace=monitoring.namespace,
                log_group=monitoring.log_group.log_group_name,
                region=Aws.REGION,
                internal_secret=config.internal_secret_name,
            ),
        )
        observed.node.add_dependency(workloads.namespace, collector_role)
        lockdown = cluster.cluster.add_manifest(
            "SdeksLockdown", netpol.runtime_policy(namespace=config.namespace)
        )
        lockdown.node.add_dependency(workloads.namespace, cluster.vpc_cni)
        lock_callback_topic(
            messaging, publishers=[workloads.dispatcher_role, workloads.runtime_role]
        )

        grant_data_plane(
            dispatcher=workloads.dispatcher_role,
            runtime=workloads.runtime_role,
            keda=keda.operator_role,
            storage=storage,
            messaging=messaging,
            state=state,
            extra_link_buckets=config.extra_link_buckets,
        )
        client_policy = client_managed_policy(
            self,
            "ClientPolicy",
            name=f"{names.prefix}-client",
            storage=storage,
            messaging=messaging,
        )
        # `sdeks status / tasks / wait / cancel` read the task table; cancel marks a queued
        # task cancelled and publishes its callback.
        state.grant_tasks(client_policy)
        self._outputs(config, storage, messaging, state, cluster, client_policy, monitoring)
        self.storage, self.messaging, self.state, self.cluster = storage, messaging, state, cluster
        self.monitoring = monitoring
        self.karpenter, self.keda, self.workloads = karpenter, keda, workloads

    def _outputs(
        self,
        config: DeployConfig,
        storage: Storage,
        messaging: Messaging,
        state: TaskState,
        cluster: Cluster,
        client_policy: iam.ManagedPolicy,
        monitoring: Monitoring,
    ) -> None:
        first = config.runtimes[0]
        message = json.dumps(
            {
                "task": {
                    "metadata": {
                        "id": "first-task",
                        "runtime": first.name,
                        "tasktype": "text-to-image",
                        "prefix": "output",
                    },
                    "content": {"prompt": "a lighthouse at dawn", "steps": 20},
                }
            },
            separators=(",", ":"),
        )
        attrs = json.dumps({RUNTIME_ATTRIBUTE: {"DataType": "String", "StringValue": first.name}})
        outputs = {
            "TaskTopicArn": messaging.task_topic.topic_arn,
            "CallbackTopicArn": messaging.callback_topic.topic_arn,
            "OutputBucketName": storage.output_bucket.bucket_name,
            "ModelsBucketName": storage.models_bucket.bucket_name,
            "TaskTableName": state.table.table_name,
            "ClusterName": cluster.name,
            "ClientPolicyArn": client_policy.managed_policy_arn,
            "AlarmTopicArn": monitoring.topic.topic_arn,
            "DashboardUrl": (
                f"https://{Aws.REGION}.console.aws.amazon.com/cloudwatch/home?region="
                f"{Aws.REGION}#dashboards/dashboard/{config.prefix}"
            ),
            # The pods and the dispatcher start once this Secret exists (docs/deploy.md).
            "InternalSecretCommand": (
                f"kubectl -n {config.namespace} create secret generic "
                f"{config.internal_secret_name} "
                f'--from-literal={k8s.POD_TOKEN_KEY}="$(openssl rand -hex 32)" '
                f'--from-literal={k8s.CALLBACK_SECRET_KEY}="$(openssl rand -hex 32)"'
            ),
            "KubeconfigCommand": (
                f"aws eks update-kubeconfig --region {Aws.REGION} --name {cluster.name}"
            ),
            "PublishFirstTaskCommand": (
                f"aws sns publish --region {Aws.REGION} --topic-arn "
                f"{messaging.task_topic.topic_arn} --message '{message}' "
                f"--message-attributes '{attrs}'"
            ),
        }
        if config.webhooks:
            # The dispatcher starts once this Secret exists (docs/deploy.md, "Webhooks").
            outputs["WebhookSecretCommand"] = (
                f"kubectl -n {config.namespace} create secret generic "
                f"{config.webhook_secret_name} "
                f'--from-literal={config.webhook_secret_key}="$(openssl rand -hex 32)"'
            )
        for key, value in outputs.items():
            CfnOutput(self, key, value=value)


def lock_callback_topic(messaging: Messaging, *, publishers: list[iam.Role]) -> None:
    """Only `publishers` may publish to the callback topic, whatever other identity
    policies in the account allow: its subscribers act on callbacks, so a forged one
    must not get in (and each callback is signed besides, docs/contract.md)."""
    topic = messaging.callback_topic
    arns = [role.role_arn for role in publishers]
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="PublishOnlyDispatcherAndPods",
            effect=iam.Effect.ALLOW,
            principals=[iam.ArnPrincipal(arn) for arn in arns],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
        )
    )
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="DenyPublishByOthers",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            # Pod Identity sessions are assumed-role sessions: aws:PrincipalArn is the role.
            conditions={"ArnNotEquals": {"aws:PrincipalArn": arns}},
        )
    )


def _send_and_receive(queues: list[str]) -> iam.PolicyStatement:
    # Batch variants (DeleteMessageBatch, ChangeMessageVisibilityBatch, ...) are
    # authorized by these same action names.
    return iam.PolicyStatement(
        actions=[
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
            "sqs:SendMessage",
        ],
        resources=queues,
    )


def _use_key(*keys: str) -> iam.PolicyStatement:
    """Encrypt into / decrypt from KMS-encrypted topics and queues (SSE data keys)."""
    return iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=list(keys))


def grant_data_plane(
    *,
    dispatcher: iam.Role,
    runtime: iam.Role,
    keda: iam.Role,
    storage: Storage,
    messaging: Messaging,
    state: TaskState,
    extra_link_buckets: list[str],
) -> None:
    """Least privilege for the pods, on exact ARNs; no statement has a bare `*` resource."""
    callback = messaging.callback_topic.topic_arn
    runtime_queues = [q.queue.queue_arn for q in messaging.runtime_queues.values()]
    task_queues = [q.queue.queue_arn for q in messaging.task_pairs]

    # 1. Dispatcher: consume every task queue, forward catch-all tasks to runtime queues,
    #    publish failure callbacks, resolve s3:// image links, keep rejected messages,
    #    deliver webhooks from the webhooks queue (the queue key covers both).
    link_objects = [
        storage.models_bucket.arn_for_objects("*"),
        storage.output_bucket.arn_for_objects("*"),
        *(f"arn:{Aws.PARTITION}:s3:::{b}/*" for b in extra_link_buckets),
    ]
    for statement in (
        _send_and_receive(task_queues),
        _use_key(messaging.queue_key.key_arn, messaging.topic_key.key_arn),
        iam.PolicyStatement(actions=["sns:Publish"], resources=[callback]),
        iam.PolicyStatement(actions=["s3:GetObject"], resources=link_objects),
        iam.PolicyStatement(
            actions=["s3:PutObject"],
            resources=[storage.output_bucket.arn_for_objects(f"{REJECTED_PREFIX}*")],
        ),
    ):
        dispatcher.add_to_principal_policy(statement)
    if messaging.webhooks:
        # Consume only: nothing but the callback topic sends to it.
        dispatcher.add_to_principal_policy(
            iam.PolicyStatement(
                actions=[
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:ChangeMessageVisibility",
                    "sqs:GetQueueAttributes",
                ],
                resources=[messaging.webhooks.queue.queue_arn],
            )
        )
    state.grant_tasks(dispatcher)
    nag.acknowledge(
        dispatcher,
        "Object ARNs: `s3://` image links may name any key of the allow-listed buckets "
        "(GetObject only), and rejected messages are kept under `rejected/` (PutObject only).",
        *nag.bucket_objects(storage.models_bucket),
        *nag.bucket_objects(storage.output_bucket),
        *nag.bucket_objects(storage.output_bucket, f"{REJECTED_PREFIX}*"),
        *(nag.literal_bucket_objects(b) for b in extra_link_buckets),
    )

    # 2. Runtime pods: read models, write outputs, publish callbacks, record status.
    for statement in (
        iam.PolicyStatement(
            actions=["s3:ListBucket"], resources=[storage.models_bucket.bucket_arn]
        ),
        iam.PolicyStatement(
            actions=["s3:GetObject"], resources=[storage.models_bucket.arn_for_objects("*")]
        ),
        iam.PolicyStatement(
            actions=["s3:PutObject"], resources=[storage.output_bucket.arn_for_objects("*")]
        ),
        iam.PolicyStatement(actions=["sns:Publish"], resources=[callback]),
        _use_key(messaging.topic_key.key_arn),
    ):
        runtime.add_to_principal_policy(statement)
    state.grant_tasks(runtime)
    nag.acknowledge(
        runtime,
        "Object ARNs: pods read any checkpoint under the models bucket's A1111 folders and "
        "write `{prefix}/{id}/...` outputs, whose prefix each task chooses.",
        *nag.bucket_objects(storage.models_bucket),
        *nag.bucket_objects(storage.output_bucket),
    )

    # 3. KEDA's operator reads queue depth (visible + in-flight) of each runtime queue.
    keda.add_to_principal_policy(
        iam.PolicyStatement(actions=["sqs:GetQueueAttributes"], resources=runtime_queues)
    )


def client_managed_policy(
    scope: Construct, id: str, *, name: str, storage: Storage, messaging: Messaging
) -> iam.ManagedPolicy:
    """What a user or app needs to publish tasks, wait for callbacks and read outputs."""
    policy = iam.ManagedPolicy(
        scope,
        id,
        managed_policy_name=name,
        description="sdeks: publish tasks, wait for callbacks (sdeks submit --wait), read outputs",
        statements=[
            iam.PolicyStatement(
                actions=["sns:Publish"], resources=[messaging.task_topic.topic_arn]
            ),
            # Both topics are encrypted: publishing needs a data key.
            _use_key(messaging.topic_key.key_arn),
            # Subscribe only: the topic policy lets only the dispatcher and the pods
            # publish callbacks (`sdeks cancel` of a queued task leaves its callback to
            # the dispatcher, docs/lifecycle.md).
            iam.PolicyStatement(
                actions=["sns:Subscribe", "sns:Unsubscribe"],
                resources=[messaging.callback_topic.topic_arn],
            ),
            # `sdeks submit --wait` listens on a temporary queue it names sdeks-cli-<random>.
            iam.PolicyStatement(
                actions=[
                    "sqs:CreateQueue",
                    "sqs:DeleteQueue",
                    "sqs:GetQueueAttributes",
                    "sqs:SetQueueAttributes",
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                ],
                resources=[
                    f"arn:{Aws.PARTITION}:sqs:{Aws.REGION}:{Aws.ACCOUNT_ID}:{CLI_QUEUE_PREFIX}*"
                ],
            ),
            iam.PolicyStatement(
                actions=["s3:GetObject"], resources=[storage.output_bucket.arn_for_objects("*")]
            ),
        ],
    )
    nag.acknowledge(
        policy,
        "Clients read any output (keys are chosen per task) and create their own temporary "
        f"callback queues, named `{CLI_QUEUE_PREFIX}<random>` at run time.",
        *nag.bucket_objects(storage.output_bucket),
        f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:sqs:<AWS::Region>:<AWS::AccountId>:{CLI_QUEUE_PREFIX}*]",
    )
    return policy
