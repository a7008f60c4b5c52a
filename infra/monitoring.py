"""Alarms on an alarm topic, and the CloudWatch dashboard (docs/operate.md, "Alarms").

Queue alarms use the SQS metrics AWS publishes. The others use the application
metrics the collector (infra.collector) writes from the dispatcher's and the pods'
Prometheus endpoints, in the namespace `metrics_namespace(prefix)`:

- no ready pods: `sdeks_dispatcher_pods{runtime}` is what the dispatcher sees in the
  runtime's EndpointSlices (ready, not draining); with two dispatchers the Maximum
  counts. Missing data counts as zero pods (a stopped collector shows up too).
- failed callbacks: the pods' `sdeks_runtime_jobs_total{runtime,status}` and the
  dispatcher's `sdeks_dispatcher_jobs_total{runtime,outcome="failed"}` (tasks it failed
  before any pod: bad links, unknown model, retries spent).
- dispatcher errors: `sdeks_dispatcher_errors_total`, unexpected exceptions it survived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra import k8s
from infra.config import AlarmConfig
from infra.messaging import QueuePair

MINUTE = Duration.minutes(1)


def metrics_namespace(prefix: str) -> str:
    return f"sdeks/{prefix}"


@dataclass(frozen=True)
class _Metrics:
    """Application metrics of one stack, as CloudWatch metric objects."""

    namespace: str

    def metric(
        self, name: str, statistic: str, period: Duration = MINUTE, **dimensions: str
    ) -> cw.Metric:
        return cw.Metric(
            namespace=self.namespace,
            metric_name=name,
            dimensions_map=dimensions,
            statistic=statistic,
            period=period,
            label=" ".join([name.removeprefix("sdeks_"), *dimensions.values()]),
        )

    def pods(self, runtime: str) -> cw.Metric:
        return self.metric("sdeks_dispatcher_pods", "Maximum", runtime=runtime)

    def pod_jobs(self, runtime: str, status: str, period: Duration) -> cw.Metric:
        return self.metric(
            "sdeks_runtime_jobs_total", "Sum", period, runtime=runtime, status=status
        )

    def dispatcher_failed(self, runtime: str, period: Duration) -> cw.Metric:
        return self.metric(
            "sdeks_dispatcher_jobs_total", "Sum", period, runtime=runtime, outcome="failed"
        )

    def dispatcher_errors(self) -> cw.Metric:
        return self.metric(
            "sdeks_dispatcher_errors_total", "Sum", Duration.minutes(5), component=k8s.DISPATCHER
        )


class Monitoring(Construct):
    """The alarm topic, one alarm per concern (per queue or runtime where it applies), the
    CloudWatch dashboard, and the log group the collector writes EMF records to."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        prefix: str,
        thresholds: AlarmConfig,
        runtime_queues: dict[str, QueuePair],
        dlqs: Mapping[str, sqs.IQueue],
        topic_key: kms.IKey,
    ) -> None:
        super().__init__(scope, id)
        self.namespace = metrics_namespace(prefix)
        metrics = _Metrics(self.namespace)
        self.log_group = logs.LogGroup(
            self,
            "MetricsLog",
            log_group_name=f"/sdeks/{prefix}/metrics",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=RemovalPolicy.DESTROY,
        )
        self.topic = sns.Topic(
            self,
            "AlarmTopic",
            topic_name=f"{prefix}-alarms",
            master_key=topic_key,
            enforce_ssl=True,
        )
        # CloudWatch publishes into the encrypted topic: it needs a data key.
        topic_key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:GenerateDataKey*", "kms:Decrypt"],
                resources=["*"],
            )
        )
        for email in thresholds.emails:
            self.topic.add_subscription(subs.EmailSubscription(email))
        action = cw_actions.SnsAction(self.topic)
        self.alarms: dict[str, cw.Alarm] = {}

        def alarm(key: str, description: str, **props: object) -> cw.Alarm:
            made = cw.Alarm(
                self,
                f"Alarm-{key}",
                alarm_name=f"{prefix}-{key}",
                alarm_description=f"{description} Runbook: docs/operate.md, alarm {key}.",
                **props,  # type: ignore[arg-type]
            )
            made.add_alarm_action(action)
            made.add_ok_action(action)
            self.alarms[key] = made
            return made

        # 1. Any message in a dead-letter queue.
        for name, dlq in dlqs.items():
            alarm(
                f"dlq-{name}",
                f"Messages in the {name} dead-letter queue.",
                metric=dlq.metric_approximate_number_of_messages_visible(
                    statistic="Maximum", period=MINUTE
                ),
                threshold=thresholds.dlq_messages,
                evaluation_periods=1,
                comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            )
        for runtime, pair in runtime_queues.items():
            # 2. The oldest task of a runtime has waited too long.
            alarm(
                f"oldest-task-{runtime}",
                f"The oldest task in runtime {runtime}'s queue is older than "
                f"{thresholds.oldest_message_age_s} s.",
                metric=pair.queue.metric_approximate_age_of_oldest_message(
                    statistic="Maximum", period=MINUTE
                ),
                threshold=thresholds.oldest_message_age_s,
                evaluation_periods=3,
                comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            )
            # 3. Tasks wait and the runtime has no ready pod, for N minutes.
            alarm(
                f"no-pods-{runtime}",
                f"Runtime {runtime} has had queued tasks and no ready pod for "
                f"{thresholds.no_pods_minutes} minutes.",
                metric=cw.MathExpression(
                    expression="IF(queued > 0 AND FILL(pods, 0) < 1, 1, 0)",
                    using_metrics={
                        "queued": pair.queue.metric_approximate_number_of_messages_visible(
                            statistic="Maximum", period=MINUTE
                        ),
                        "pods": metrics.pods(runtime),
                    },
                    period=MINUTE,
                    label=f"queued tasks and no ready pod ({runtime})",
                ),
                threshold=1,
                evaluation_periods=thresholds.no_pods_minutes,
                datapoints_to_alarm=thresholds.no_pods_minutes,
                comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            )
            # 4. Too large a share of the runtime's terminal callbacks are failures.
            window = Duration.minutes(thresholds.failed_callback_minutes)
            failed = "FILL(pf, 0) + FILL(df, 0)"
            total = "FILL(pf, 0) + FILL(ps, 0) + FILL(pc, 0) + FILL(df, 0)"
            alarm(
                f"failed-callbacks-{runtime}",
                f"Over {thresholds.failed_callback_percent:g}% of runtime {runtime}'s "
                f"callbacks failed in {thresholds.failed_callback_minutes} minutes.",
                metric=cw.MathExpression(
                    expression=(
                        f"IF({total} >= {thresholds.failed_callback_min_count}, "
                        f"100 * ({failed}) / ({total}), 0)"
                    ),
                    using_metrics={
                        "pf": metrics.pod_jobs(runtime, "failed", window),
                        "ps": metrics.pod_jobs(runtime, "succeeded", window),
                        "pc": metrics.pod_jobs(runtime, "cancelled", window),
                        "df": metrics.dispatcher_failed(runtime, window),
                    },
                    period=window,
                    label=f"failed callbacks % ({runtime})",
                ),
                threshold=thresholds.failed_callback_percent,
                evaluation_periods=1,
                comparison_operator=cw.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            )
        # 5. The dispatcher survived unexpected errors (SQS/SNS down, a bug).
        alarm(
            "dispatcher-errors",
            "The dispatcher logged unexpected errors (messages kept for a retry, planning).",
            metric=metrics.dispatcher_errors(),
            threshold=thresholds.dispatcher_errors,
            evaluation_periods=1,
            comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
        )

        self.dashboard = cw.Dashboard(
            self,
            "Dashboard",
            dashboard_name=prefix,
            widgets=_dashboard_rows(metrics, runtime_queues, dlqs, list(self.alarms.values())),
        )


def _dashboard_rows(
    metrics: _Metrics,
    runtime_queues: dict[str, QueuePair],
    dlqs: Mapping[str, sqs.IQueue],
    alarms: list[cw.Alarm],
) -> list[list[cw.IWidget]]:
    ns = metrics.namespace
    rows: list[list[cw.IWidget]] = [
        [
            cw.AlarmStatusWidget(title="Alarms", alarms=alarms, width=24, height=4),
        ],
        [
            cw.GraphWidget(
                title="Dead-letter queues (messages)",
                left=[
                    q.metric_approximate_number_of_messages_visible(
                        statistic="Maximum", period=MINUTE, label=name
                    )
                    for name, q in dlqs.items()
                ],
                width=8,
            ),
            cw.GraphWidget(
                title="Failed callbacks by error code (dispatcher)",
                left=[
                    cw.MathExpression(
                        expression=(
                            f"SEARCH('{{{ns},code}} MetricName=\"sdeks_dispatcher_failures_total\"'"
                            ", 'Sum', 300)"
                        ),
                        label="",
                        period=Duration.minutes(5),
                    )
                ],
                stacked=True,
                width=8,
            ),
            cw.GraphWidget(
                title="GPUs in use (GPU NodePool) and dispatcher errors",
                left=[
                    metrics.metric(
                        "karpenter_nodepools_usage",
                        "Maximum",
                        nodepool=k8s.GPU_NODE_POOL,
                        resource_type=k8s.GPU_RESOURCE,
                    )
                ],
                right=[metrics.dispatcher_errors()],
                width=8,
            ),
        ],
    ]
    for runtime, pair in runtime_queues.items():
        five = Duration.minutes(5)
        rows.append(
            [
                cw.TextWidget(markdown=f"## Runtime `{runtime}`", width=24, height=1),
            ]
        )
        rows.append(
            [
                cw.GraphWidget(
                    title=f"{runtime}: queue depth and in flight",
                    left=[
                        pair.queue.metric_approximate_number_of_messages_visible(
                            statistic="Maximum", period=MINUTE, label="queued (visible)"
                        ),
                        pair.queue.metric_approximate_number_of_messages_not_visible(
                            statistic="Maximum", period=MINUTE, label="in flight"
                        ),
                        pair.dlq.metric_approximate_number_of_messages_visible(
                            statistic="Maximum", period=MINUTE, label="DLQ"
                        ),
                    ],
                    right=[
                        pair.queue.metric_approximate_age_of_oldest_message(
                            statistic="Maximum", period=MINUTE, label="oldest task (s)"
                        )
                    ],
                    width=6,
                ),
                cw.GraphWidget(
                    title=f"{runtime}: outcomes by status",
                    left=[
                        *(
                            metrics.pod_jobs(runtime, status, five)
                            for status in ("succeeded", "failed", "cancelled")
                        ),
                        metrics.dispatcher_failed(runtime, five),
                    ],
                    stacked=True,
                    width=6,
                ),
                cw.GraphWidget(
                    title=f"{runtime}: render time p50 / p95 (s, worst pod)",
                    left=[
                        metrics.metric(
                            "sdeks_runtime_render_seconds_recent",
                            "Maximum",
                            runtime=runtime,
                            quantile=q,
                        )
                        for q in ("0.5", "0.95")
                    ],
                    width=4,
                ),
                cw.GraphWidget(
                    title=f"{runtime}: model switches and load time",
                    left=[
                        metrics.metric(
                            "sdeks_dispatcher_model_switches_total", "Sum", five, runtime=runtime
                        )
                    ],
                    right=[
                        metrics.metric(
                            "sdeks_runtime_phase_seconds",
                            "Sum",
                            five,
                            runtime=runtime,
                            phase="model_load",
                        )
                    ],
                    width=4,
                ),
                cw.GraphWidget(
                    title=f"{runtime}: pods",
                    left=[
                        metrics.pods(runtime),
                        metrics.metric("sdeks_runtime_info", "Sum", runtime=runtime),
                        metrics.metric("sdeks_runtime_busy_slots", "Sum", runtime=runtime),
                    ],
                    width=4,
                ),
            ]
        )
    return rows
