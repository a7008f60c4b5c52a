"""Alarms, the dashboard, the callback topic's policy, the collector and the lock-down,
asserted on the session synth (one synth for the whole infra suite)."""

from __future__ import annotations

import json
from typing import Any

import yaml
from aws_cdk.assertions import Match

from dispatcher.metrics import Metrics
from infra import collector, k8s, netpol
from infra.config import AlarmConfig
from runtime.metrics import PodMetrics
from sdeks.names import StackNames
from tests.infra.conftest import Synth, ref

NAMES = StackNames("sdeks")
RUNTIMES = ["sdruntime", "sdxl"]
DEFAULTS = AlarmConfig()
NAMESPACE = "sdeks/sdeks"


def _alarms(synth: Synth) -> dict[str, dict[str, Any]]:
    return {
        a["Properties"]["AlarmName"]: a["Properties"]
        for a in synth.resources("AWS::CloudWatch::Alarm").values()
    }


def _alarm_topic(synth: Synth) -> dict[str, str]:
    return {"Ref": synth.logical_id("AWS::SNS::Topic", TopicName="sdeks-alarms")}


def _queue(synth: Synth, name: str) -> str:
    return synth.logical_id("AWS::SQS::Queue", QueueName=name)


def _metric_stats(alarm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> MetricStat of a metric-math alarm."""
    return {m["Id"]: m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m}


def test_every_alarm_notifies_the_alarm_topic(synth: Synth) -> None:
    alarms = _alarms(synth)
    expected = {
        *(f"sdeks-dlq-{r}" for r in RUNTIMES),
        "sdeks-dlq-catch-all",
        "sdeks-dlq-webhooks",
        *(f"sdeks-oldest-task-{r}" for r in RUNTIMES),
        *(f"sdeks-no-pods-{r}" for r in RUNTIMES),
        *(f"sdeks-failed-callbacks-{r}" for r in RUNTIMES),
        "sdeks-dispatcher-errors",
    }
    assert set(alarms) == expected
    for name, alarm in alarms.items():
        assert alarm["AlarmActions"] == [_alarm_topic(synth)], name
        assert alarm["OKActions"] == [_alarm_topic(synth)], name
        assert "docs/operate.md" in alarm["AlarmDescription"], name
    # The topic is encrypted and CloudWatch may use its key.
    topic = synth.resources("AWS::SNS::Topic")[_alarm_topic(synth)["Ref"]]["Properties"]
    key_id = topic["KmsMasterKeyId"]["Fn::GetAtt"][0]
    statements = synth.resources("AWS::KMS::Key")[key_id]["Properties"]["KeyPolicy"]["Statement"]
    assert any(st.get("Principal") == {"Service": "cloudwatch.amazonaws.com"} for st in statements)


def test_dlq_alarms_fire_on_any_message(synth: Synth) -> None:
    alarms = _alarms(synth)
    dlqs = {
        **{f"sdeks-dlq-{r}": NAMES.task_dlq(r) for r in RUNTIMES},
        "sdeks-dlq-catch-all": NAMES.catch_all_dlq,
        "sdeks-dlq-webhooks": NAMES.webhook_dlq,
    }
    for alarm_name, queue_name in dlqs.items():
        alarm = alarms[alarm_name]
        assert alarm["Namespace"] == "AWS/SQS"
        assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert alarm["Dimensions"] == [
            {"Name": "QueueName", "Value": {"Fn::GetAtt": [_queue(synth, queue_name), "QueueName"]}}
        ]
        assert alarm["Threshold"] == DEFAULTS.dlq_messages == 1
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert alarm["TreatMissingData"] == "notBreaching"


def test_oldest_task_alarm_per_runtime_queue(synth: Synth) -> None:
    for runtime in RUNTIMES:
        alarm = _alarms(synth)[f"sdeks-oldest-task-{runtime}"]
        assert alarm["MetricName"] == "ApproximateAgeOfOldestMessage"
        assert alarm["Dimensions"][0]["Value"] == {
            "Fn::GetAtt": [_queue(synth, NAMES.task_queue(runtime)), "QueueName"]
        }
        assert alarm["Threshold"] == DEFAULTS.oldest_message_age_s


def test_no_pods_alarm_combines_the_queue_and_the_dispatchers_pod_count(synth: Synth) -> None:
    for runtime in RUNTIMES:
        alarm = _alarms(synth)[f"sdeks-no-pods-{runtime}"]
        stats = _metric_stats(alarm)
        assert stats["queued"]["Metric"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert stats["queued"]["Metric"]["Dimensions"][0]["Value"] == {
            "Fn::GetAtt": [_queue(synth, NAMES.task_queue(runtime)), "QueueName"]
        }
        assert stats["pods"]["Metric"] == {
            "Namespace": NAMESPACE,
            "MetricName": "sdeks_dispatcher_pods",
            "Dimensions": [{"Name": "runtime", "Value": runtime}],
        }
        assert stats["pods"]["Stat"] == "Maximum"
        (expression,) = [m for m in alarm["Metrics"] if "Expression" in m]
        assert expression["Expression"] == "IF(queued > 0 AND FILL(pods, 0) < 1, 1, 0)"
        assert alarm["EvaluationPeriods"] == DEFAULTS.no_pods_minutes
        assert alarm["DatapointsToAlarm"] == DEFAULTS.no_pods_minutes


def test_failed_callback_rate_alarm_counts_pods_and_dispatcher(synth: Synth) -> None:
    alarm = _alarms(synth)["sdeks-failed-callbacks-sdxl"]
    stats = _metric_stats(alarm)
    dims = {k: {d["Name"]: d["Value"] for d in s["Metric"]["Dimensions"]} for k, s in stats.items()}
    assert dims == {
        "pf": {"runtime": "sdxl", "status": "failed"},
        "ps": {"runtime": "sdxl", "status": "succeeded"},
        "pc": {"runtime": "sdxl", "status": "cancelled"},
        "df": {"runtime": "sdxl", "outcome": "failed"},
    }
    assert stats["df"]["Metric"]["MetricName"] == "sdeks_dispatcher_jobs_total"
    assert {s["Period"] for s in stats.values()} == {DEFAULTS.failed_callback_minutes * 60}
    (expression,) = [m["Expression"] for m in alarm["Metrics"] if "Expression" in m]
    assert expression.startswith(
        f"IF(FILL(pf, 0) + FILL(ps, 0) + FILL(pc, 0) + FILL(df, 0) >= "
        f"{DEFAULTS.failed_callback_min_count}, 100 * (FILL(pf, 0) + FILL(df, 0))"
    )
    assert alarm["Threshold"] == DEFAULTS.failed_callback_percent


def test_dispatcher_errors_alarm(synth: Synth) -> None:
    alarm = _alarms(synth)["sdeks-dispatcher-errors"]
    (stat,) = _metric_stats(alarm).values()
    assert stat["Metric"] == {
        "Namespace": NAMESPACE,
        "MetricName": "sdeks_dispatcher_errors_total",
        "Dimensions": [{"Name": "component", "Value": k8s.DISPATCHER}],
    }
    assert stat["Stat"] == "Sum" and stat["Period"] == 300
    assert alarm["Threshold"] == DEFAULTS.dispatcher_errors


def test_alarm_metrics_are_ones_the_services_export_and_the_collector_keeps() -> None:
    # GIVEN the metric names the services register (exposition names: counters end _total)
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for registry in (Metrics().registry, PodMetrics("sdruntime", 1).registry)
        for family in registry.collect()
    }
    # THEN every sdeks metric the collector forwards exists, so alarms never watch a ghost
    for name in collector.METRICS:
        if name.startswith("sdeks_"):
            assert name in exported, name


def test_dashboard_has_a_row_per_runtime_with_the_operator_views(synth: Synth) -> None:
    (dashboard,) = synth.resources("AWS::CloudWatch::Dashboard").values()
    body = json.loads(_join(dashboard["Properties"]["DashboardBody"]))
    titles = [w["properties"].get("title", "") for w in body["widgets"]]
    assert "Alarms" in titles
    for runtime in RUNTIMES:
        for view in (
            "queue depth and in flight",
            "outcomes by status",
            "render time p50 / p95",
            "model switches and load time",
            "pods",
        ):
            assert any(t.startswith(f"{runtime}: {view}") for t in titles), (runtime, view)
    text = json.dumps(body)
    for metric in (
        "ApproximateNumberOfMessagesNotVisible",
        "sdeks_runtime_render_seconds_recent",
        "sdeks_dispatcher_model_switches_total",
        "karpenter_nodepools_usage",
        "sdeks_dispatcher_failures_total",
    ):
        assert metric in text, metric


def _join(value: Any) -> str:
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        return "".join(_join(p) for p in value["Fn::Join"][1])
    return "x"  # a token inside a string (queue names, alarm ARNs)


def test_callback_topic_policy_lets_only_dispatcher_and_pods_publish(synth: Synth) -> None:
    callback = synth.logical_id("AWS::SNS::Topic", TopicName=NAMES.callback_topic)
    (policy,) = [
        p["Properties"]
        for p in synth.resources("AWS::SNS::TopicPolicy").values()
        if p["Properties"]["Topics"] == [{"Ref": callback}]
    ]
    statements = {st.get("Sid"): st for st in policy["PolicyDocument"]["Statement"]}
    roles = sorted(
        (
            {"Fn::GetAtt": [a["Properties"]["RoleArn"]["Fn::GetAtt"][0], "Arn"]}
            for a in synth.resources("AWS::EKS::PodIdentityAssociation").values()
            if a["Properties"]["ServiceAccount"] in ("sdeks-dispatcher", "sdeks-runtime")
        ),
        key=json.dumps,
    )
    allow = statements["PublishOnlyDispatcherAndPods"]
    assert allow["Effect"] == "Allow" and allow["Action"] == "sns:Publish"
    assert sorted((p for p in allow["Principal"]["AWS"]), key=json.dumps) == roles
    deny = statements["DenyPublishByOthers"]
    assert deny["Effect"] == "Deny" and deny["Principal"] == {"AWS": "*"}
    assert deny["Action"] == "sns:Publish"
    assert sorted(deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"], key=json.dumps) == roles
    # Clients subscribe to callbacks; they no longer publish them.
    client = synth.resources("AWS::IAM::ManagedPolicy")
    for managed in client.values():
        for st in managed["Properties"]["PolicyDocument"]["Statement"]:
            if st["Resource"] == {"Ref": callback}:
                assert "sns:Publish" not in st["Action"], st


def test_pods_and_dispatcher_read_the_internal_secret(synth: Synth) -> None:
    def secret_env(deployment: dict[str, Any]) -> dict[str, Any]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
        }

    internal = synth.config.internal_secret_name
    expected = {
        "SDEKS_POD_TOKEN": {"name": internal, "key": k8s.POD_TOKEN_KEY},
        "SDEKS_CALLBACK_SECRET": {"name": internal, "key": k8s.CALLBACK_SECRET_KEY},
    }
    for runtime in RUNTIMES:
        env = secret_env(synth.manifest("Deployment", k8s.runtime_workload_name(runtime)))
        assert env == expected
    assert expected.items() <= secret_env(synth.manifest("Deployment", k8s.DISPATCHER)).items()


def test_network_policy_admits_only_the_dispatcher_and_the_collector(synth: Synth) -> None:
    policy = synth.manifest("NetworkPolicy", netpol.RUNTIME_POLICY)["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "sdeks-runtime"}}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    sources = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in ingress["from"]}
    assert sources == {k8s.DISPATCHER, collector.COLLECTOR}
    assert ingress["ports"] == [{"protocol": "TCP", "port": k8s.RUNTIME_PORT}]
    # Egress: DNS, the Pod Identity agent, HTTPS; nothing else (no other pod port, no HTTP).
    ports = sorted((p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"])
    assert ports == [("TCP", 53), ("TCP", 80), ("TCP", 443), ("UDP", 53)]
    (agent,) = [r for r in policy["egress"] if r["ports"] == [{"protocol": "TCP", "port": 80}]]
    assert agent["to"] == [{"ipBlock": {"cidr": "169.254.170.23/32"}}]
    # The VPC CNI add-on enforces it.
    synth.template.has_resource_properties(
        "AWS::EKS::Addon",
        {
            "AddonName": "vpc-cni",
            "ConfigurationValues": Match.serialized_json({"enableNetworkPolicy": "true"}),
            "ResolveConflicts": "OVERWRITE",
        },
    )


def test_collector_scrapes_both_services_with_the_token_into_emf(synth: Synth) -> None:
    config_map = synth.manifest("ConfigMap", collector.COLLECTOR)
    config = yaml.safe_load(config_map["data"]["collector.yaml"])
    jobs = {j["job_name"]: j for j in config["receivers"]["prometheus"]["config"]["scrape_configs"]}
    assert set(jobs) == {"sdeks-dispatcher", "sdeks-runtime", "karpenter"}
    assert jobs["sdeks-runtime"]["authorization"]["credentials_file"] == (
        f"{collector.TOKEN_DIR}/{k8s.POD_TOKEN_KEY}"
    )
    assert "authorization" not in jobs["sdeks-dispatcher"]
    emf = config["exporters"]["awsemf"]
    assert emf["namespace"] == NAMESPACE
    log_group = synth.logical_id("AWS::Logs::LogGroup", LogGroupName="/sdeks/sdeks/metrics")
    assert emf["log_group_name"] == ref(log_group)
    selectors = {s for d in emf["metric_declarations"] for s in d["metric_name_selectors"]}
    assert selectors == {f"^{name}$" for name in collector.METRICS}
    deployment = synth.manifest("Deployment", collector.COLLECTOR)["spec"]
    assert deployment["replicas"] == 1
    (volume,) = [v for v in deployment["template"]["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == synth.config.internal_secret_name
    # Its Pod Identity role may write to the metrics log group, nothing else.
    association = next(
        a
        for a in synth.resources("AWS::EKS::PodIdentityAssociation").values()
        if a["Properties"]["ServiceAccount"] == collector.COLLECTOR
    )
    role_id = association["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    actions = {
        action
        for p in synth.resources("AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
        for st in p["Properties"]["PolicyDocument"]["Statement"]
        for action in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    }
    assert actions and all(a.startswith("logs:") for a in actions), actions


def test_grafana_dashboard_queries_only_metrics_the_services_export() -> None:
    import re
    from pathlib import Path

    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for registry in (Metrics().registry, PodMetrics("sdruntime", 1).registry)
        for family in registry.collect()
    }
    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "infra" / "grafana" / "sdeks.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = {name for e in exprs for name in re.findall(r"\bsdeks_[a-z_]+", e)}
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in exported or exported.get(base) == "histogram", name
    # The views the issue asks for are there.
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for view in ("outcomes by status", "error code", "p50 / p95", "model switches", "pods"):
        assert view in titles, view
