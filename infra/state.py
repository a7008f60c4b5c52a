"""The task table: status, idempotency and queue position, keyed by task id.

Declared from `sdeks.tasks.table_schema`, the schema the local stack creates, so
the two cannot drift: partition key `id`, the status index, TTL on `expires_at`.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

from sdeks.names import StackNames
from sdeks.tasks import STATUS_INDEX, TTL_ATTRIBUTE, table_schema

_TYPES = {
    "S": dynamodb.AttributeType.STRING,
    "N": dynamodb.AttributeType.NUMBER,
    "B": dynamodb.AttributeType.BINARY,
}
#: What the services and the CLI do with the table (sdeks.tasks): no scans, no table admin.
TASK_TABLE_ACTIONS = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:Query",
]


def _key(
    schema: list[dict[str, str]], kind: str, types: dict[str, str]
) -> dynamodb.Attribute | None:
    for key in schema:
        if key["KeyType"] == kind:
            return dynamodb.Attribute(
                name=key["AttributeName"], type=_TYPES[types[key["AttributeName"]]]
            )
    return None


class TaskState(Construct):
    def __init__(
        self, scope: Construct, id: str, *, names: StackNames, destroy_data_on_delete: bool
    ) -> None:
        super().__init__(scope, id)
        schema = table_schema(names.task_table)
        types = {a["AttributeName"]: a["AttributeType"] for a in schema["AttributeDefinitions"]}
        partition_key = _key(schema["KeySchema"], "HASH", types)
        assert partition_key is not None
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=names.task_table,
            partition_key=partition_key,
            sort_key=_key(schema["KeySchema"], "RANGE", types),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=TTL_ATTRIBUTE,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            removal_policy=RemovalPolicy.DESTROY
            if destroy_data_on_delete
            else RemovalPolicy.RETAIN,
        )
        for index in schema.get("GlobalSecondaryIndexes", []):
            self.table.add_global_secondary_index(
                index_name=index["IndexName"],
                partition_key=_key(index["KeySchema"], "HASH", types),  # type: ignore[arg-type]
                sort_key=_key(index["KeySchema"], "RANGE", types),
                projection_type=dynamodb.ProjectionType(index["Projection"]["ProjectionType"]),
            )

    @property
    def status_index_arn(self) -> str:
        return f"{self.table.table_arn}/index/{STATUS_INDEX}"

    def grant_tasks(self, grantee: iam.IGrantable | iam.ManagedPolicy) -> None:
        """Item reads and writes on the table and its status index (exact ARNs)."""
        statement = iam.PolicyStatement(
            actions=TASK_TABLE_ACTIONS, resources=[self.table.table_arn, self.status_index_arn]
        )
        if isinstance(grantee, iam.ManagedPolicy):
            grantee.add_statements(statement)
        else:
            grantee.grant_principal.add_to_principal_policy(statement)
