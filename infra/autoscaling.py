"""Autoscaling: Karpenter brings GPU nodes, KEDA scales runtime pods on queue depth.

Karpenter's controller policy follows the policy its own getting-started
CloudFormation template grants (v1): EC2 writes are scoped by the
`kubernetes.io/cluster/<name>` and `karpenter.sh/nodepool` tags Karpenter puts
on what it launches, reads are regional.
"""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra import k8s, nag
from infra.cluster import Cluster

KARPENTER_NAMESPACE = "kube-system"
KARPENTER_SERVICE_ACCOUNT = "karpenter"
KEDA_NAMESPACE = "keda"
KEDA_OPERATOR_SERVICE_ACCOUNT = "keda-operator"


class Karpenter(Construct):
    """Karpenter (Helm), its node role, interruption queue, and the GPU NodeClass/NodePool."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        cluster: Cluster,
        version: str,
        gpu_instance_types: list[str],
        gpu_limit: int,
        drain_s: int,
    ) -> None:
        super().__init__(scope, id)
        name = cluster.name
        # Nodes Karpenter launches: the usual worker policies; Pod Identity gives pods
        # their own credentials, so nothing else goes on this role.
        self.node_role = iam.Role(
            self,
            "NodeRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(p)
                for p in (
                    "AmazonEKSWorkerNodePolicy",
                    "AmazonEKS_CNI_Policy",
                    "AmazonEC2ContainerRegistryPullOnly",
                    "AmazonSSMManagedInstanceCore",
                )
            ],
        )
        eks.AccessEntry(
            self,
            "NodeAccess",
            cluster=cluster.cluster,  # type: ignore[arg-type]  # jsii ICluster protocol
            principal=self.node_role.role_arn,
            access_entry_type=eks.AccessEntryType.EC2_LINUX,
            access_policies=[],
        )

        # Spot interruption warnings and rebalance hints reach Karpenter here, so it
        # drains a node (pods get SIGTERM) before EC2 takes it.
        self.interruption_queue = sqs.Queue(
            self,
            "InterruptionQueue",
            queue_name=f"{name}-karpenter",
            retention_period=Duration.minutes(5),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        for rule_id, source, detail_type in (
            ("Health", "aws.health", "AWS Health Event"),
            ("Spot", "aws.ec2", "EC2 Spot Instance Interruption Warning"),
            ("Rebalance", "aws.ec2", "EC2 Instance Rebalance Recommendation"),
            ("State", "aws.ec2", "EC2 Instance State-change Notification"),
        ):
            events.Rule(
                self,
                f"{rule_id}Rule",
                event_pattern=events.EventPattern(source=[source], detail_type=[detail_type]),
                targets=[targets.SqsQueue(self.interruption_queue)],
            )

        self.controller_role = cluster.pod_identity_role(
            self,
            "KarpenterController",
            namespace=KARPENTER_NAMESPACE,
            service_account=KARPENTER_SERVICE_ACCOUNT,
        )
        for statement in _controller_statements(
            cluster_name=name,
            cluster_arn=cluster.cluster.cluster_arn,
            node_role_arn=self.node_role.role_arn,
            queue_arn=self.interruption_queue.queue_arn,
        ):
            self.controller_role.add_to_principal_policy(statement)
        # The same statements rendered with cdk-nag's placeholders name each finding.
        spelled = _controller_statements(
            cluster_name=name,
            cluster_arn="<cluster>",
            node_role_arn="<node-role>",
            queue_arn="<queue>",
            region="<AWS::Region>",
            partition="<AWS::Partition>",
            account="<AWS::AccountId>",
        )
        wildcards = sorted({r for st in spelled for r in st.resources if "*" in r})
        nag.acknowledge(
            self.controller_role,
            "Karpenter's reference controller policy: it launches instances, fleets and "
            "launch templates whose ARNs do not exist yet, so writes are scoped by the "
            "cluster and nodepool tags in each statement's conditions; EC2 Describe* and "
            "pricing:GetProducts support no resource-level permissions (limited to this "
            "region by condition).",
            *(f"AwsSolutions-IAM5[Resource::{r}]" for r in wildcards),
        )
        nag.acknowledge(
            self.node_role,
            "Karpenter-launched nodes need the standard EKS worker policies (kubelet, VPC "
            "CNI, ECR pulls) and SSM for break-glass access without SSH.",
            *(
                nag.managed_policy(p)
                for p in (
                    "AmazonEKSWorkerNodePolicy",
                    "AmazonEKS_CNI_Policy",
                    "AmazonEC2ContainerRegistryPullOnly",
                    "AmazonSSMManagedInstanceCore",
                )
            ),
        )
        nag.acknowledge(
            self.interruption_queue,
            "Karpenter's interruption queue carries short-lived EC2/Health events (5 minute "
            "retention); a notice Karpenter cannot handle is stale by the time a DLQ would "
            "be read.",
            "AwsSolutions-SQS3",
        )

        self.chart = cluster.cluster.add_helm_chart(
            "Karpenter",
            chart="karpenter",
            repository="oci://public.ecr.aws/karpenter/karpenter",
            namespace=KARPENTER_NAMESPACE,
            release="karpenter",
            version=version,
            wait=True,
            timeout=Duration.minutes(10),
            values={
                "serviceAccount": {"name": KARPENTER_SERVICE_ACCOUNT},
                "settings": {
                    "clusterName": name,
                    "interruptionQueue": self.interruption_queue.queue_name,
                },
                "controller": {
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"memory": "1Gi"},
                    }
                },
            },
        )
        # Karpenter must not start before its credentials and the system nodes exist.
        self.chart.node.add_dependency(self.controller_role, cluster.system_nodes)

        node_class = k8s.gpu_node_class(
            node_role=self.node_role.role_name,
            subnet_ids=[s.subnet_id for s in cluster.node_subnets.subnets],
            security_group_ids=[cluster.cluster.cluster_security_group_id],
            tags={"sdeks.io/cluster": name},
        )
        node_pool = k8s.gpu_node_pool(
            instance_types=gpu_instance_types, gpu_limit=gpu_limit, drain_s=drain_s
        )
        self.gpu_pool = cluster.cluster.add_manifest("KarpenterGpuPool", node_class, node_pool)
        self.gpu_pool.node.add_dependency(self.chart)  # the CRDs come with the chart


class Keda(Construct):
    """KEDA (Helm) with a Pod Identity role for its operator; grants are added by the stack."""

    def __init__(self, scope: Construct, id: str, *, cluster: Cluster, version: str) -> None:
        super().__init__(scope, id)
        self.operator_role = cluster.pod_identity_role(
            self,
            "KedaOperator",
            namespace=KEDA_NAMESPACE,
            service_account=KEDA_OPERATOR_SERVICE_ACCOUNT,
        )
        self.chart = cluster.cluster.add_helm_chart(
            "Keda",
            chart="keda",
            repository="https://kedacore.github.io/charts",
            namespace=KEDA_NAMESPACE,
            create_namespace=True,
            release="keda",
            version=version,
            wait=True,
            timeout=Duration.minutes(10),
            values={"serviceAccount": {"operator": {"name": KEDA_OPERATOR_SERVICE_ACCOUNT}}},
        )
        self.chart.node.add_dependency(self.operator_role, cluster.system_nodes)


def _controller_statements(
    *,
    cluster_name: str,
    cluster_arn: str,
    node_role_arn: str,
    queue_arn: str,
    region: str = Aws.REGION,
    partition: str = Aws.PARTITION,
    account: str = Aws.ACCOUNT_ID,
) -> list[iam.PolicyStatement]:

    def ec2(resource: str) -> str:
        return f"arn:{partition}:ec2:{region}:*:{resource}"

    cluster_tag = f"aws:RequestTag/kubernetes.io/cluster/{cluster_name}"
    owned_tag = f"aws:ResourceTag/kubernetes.io/cluster/{cluster_name}"
    launched = [
        ec2(r)
        for r in (
            "fleet/*",
            "instance/*",
            "volume/*",
            "network-interface/*",
            "launch-template/*",
            "spot-instances-request/*",
        )
    ]
    profile = f"arn:{partition}:iam::{account}:instance-profile/*"
    region_cond = {"StringEquals": {"aws:RequestedRegion": region}}
    return [
        iam.PolicyStatement(
            sid="AllowScopedEC2InstanceAccessActions",
            actions=["ec2:RunInstances", "ec2:CreateFleet"],
            resources=[
                f"arn:{partition}:ec2:{region}::image/*",
                f"arn:{partition}:ec2:{region}::snapshot/*",
                ec2("security-group/*"),
                ec2("subnet/*"),
                ec2("capacity-reservation/*"),
            ],
        ),
        iam.PolicyStatement(
            sid="AllowScopedEC2LaunchTemplateAccessActions",
            actions=["ec2:RunInstances", "ec2:CreateFleet"],
            resources=[ec2("launch-template/*")],
            conditions={
                "StringEquals": {owned_tag: "owned"},
                "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedEC2InstanceActionsWithTags",
            actions=["ec2:RunInstances", "ec2:CreateFleet", "ec2:CreateLaunchTemplate"],
            resources=launched,
            conditions={
                "StringEquals": {
                    cluster_tag: "owned",
                    "aws:RequestTag/eks:eks-cluster-name": cluster_name,
                },
                "StringLike": {"aws:RequestTag/karpenter.sh/nodepool": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedResourceCreationTagging",
            actions=["ec2:CreateTags"],
            resources=launched,
            conditions={
                "StringEquals": {
                    cluster_tag: "owned",
                    "aws:RequestTag/eks:eks-cluster-name": cluster_name,
                    "ec2:CreateAction": ["RunInstances", "CreateFleet", "CreateLaunchTemplate"],
                },
                "StringLike": {"aws:RequestTag/karpenter.sh/nodepool": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedResourceTagging",
            actions=["ec2:CreateTags"],
            resources=[ec2("instance/*")],
            conditions={
                "StringEquals": {owned_tag: "owned"},
                "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
                "StringEqualsIfExists": {"aws:RequestTag/eks:eks-cluster-name": cluster_name},
                "ForAllValues:StringEquals": {
                    "aws:TagKeys": ["eks:eks-cluster-name", "karpenter.sh/nodeclaim", "Name"]
                },
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedDeletion",
            actions=["ec2:TerminateInstances", "ec2:DeleteLaunchTemplate"],
            resources=[ec2("instance/*"), ec2("launch-template/*")],
            conditions={
                "StringEquals": {owned_tag: "owned"},
                "StringLike": {"aws:ResourceTag/karpenter.sh/nodepool": "*"},
            },
        ),
        # Describe* calls take no resource ARNs: "*" limited to this region.
        iam.PolicyStatement(
            sid="AllowRegionalReadActions",
            actions=[
                "ec2:DescribeAvailabilityZones",
                "ec2:DescribeCapacityReservations",
                "ec2:DescribeImages",
                "ec2:DescribeInstances",
                "ec2:DescribeInstanceTypeOfferings",
                "ec2:DescribeInstanceTypes",
                "ec2:DescribeLaunchTemplates",
                "ec2:DescribeSecurityGroups",
                "ec2:DescribeSpotPriceHistory",
                "ec2:DescribeSubnets",
            ],
            resources=["*"],
            conditions=region_cond,
        ),
        iam.PolicyStatement(
            sid="AllowSSMReadActions",
            actions=["ssm:GetParameter"],
            resources=[f"arn:{partition}:ssm:{region}::parameter/aws/service/*"],
        ),
        # The Price List API has no resource ARNs either.
        iam.PolicyStatement(
            sid="AllowPricingReadActions", actions=["pricing:GetProducts"], resources=["*"]
        ),
        iam.PolicyStatement(
            sid="AllowInterruptionQueueActions",
            actions=["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"],
            resources=[queue_arn],
        ),
        iam.PolicyStatement(
            sid="AllowPassingInstanceRole",
            actions=["iam:PassRole"],
            resources=[node_role_arn],
            conditions={"StringEquals": {"iam:PassedToService": ["ec2.amazonaws.com"]}},
        ),
        iam.PolicyStatement(
            sid="AllowScopedInstanceProfileCreationActions",
            actions=["iam:CreateInstanceProfile"],
            resources=[profile],
            conditions={
                "StringEquals": {
                    cluster_tag: "owned",
                    "aws:RequestTag/eks:eks-cluster-name": cluster_name,
                    "aws:RequestTag/topology.kubernetes.io/region": region,
                },
                "StringLike": {"aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedInstanceProfileTagActions",
            actions=["iam:TagInstanceProfile"],
            resources=[profile],
            conditions={
                "StringEquals": {
                    owned_tag: "owned",
                    "aws:ResourceTag/topology.kubernetes.io/region": region,
                    cluster_tag: "owned",
                    "aws:RequestTag/eks:eks-cluster-name": cluster_name,
                    "aws:RequestTag/topology.kubernetes.io/region": region,
                },
                "StringLike": {
                    "aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*",
                    "aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*",
                },
            },
        ),
        iam.PolicyStatement(
            sid="AllowScopedInstanceProfileActions",
            actions=[
                "iam:AddRoleToInstanceProfile",
                "iam:RemoveRoleFromInstanceProfile",
                "iam:DeleteInstanceProfile",
            ],
            resources=[profile],
            conditions={
                "StringEquals": {
                    owned_tag: "owned",
                    "aws:ResourceTag/topology.kubernetes.io/region": region,
                },
                "StringLike": {"aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="AllowInstanceProfileReadActions",
            actions=["iam:GetInstanceProfile", "iam:ListInstanceProfiles"],
            resources=[profile],
        ),
        iam.PolicyStatement(
            sid="AllowAPIServerEndpointDiscovery",
            actions=["eks:DescribeCluster"],
            resources=[cluster_arn],
        ),
    ]
