"""The task table: status and idempotency records, keyed by task id."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct

from sdeks.names import StackNames

#: Epoch-seconds attribute after which DynamoDB deletes a record.
TTL_ATTRIBUTE = "expires_at"


class TaskState(Construct):
    def __init__(
        self, scope: Construct, id: str, *, names: StackNames, destroy_data_on_delete: bool
    ) -> None:
        super().__init__(scope, id)
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=names.task_table,
            partition_key=dynamodb.Attribute(name="id", type=dynamodb.AttributeType.STRING),
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
