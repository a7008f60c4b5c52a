"""The network and the EKS cluster: VPC, control plane, system nodes, Pod Identity."""

from __future__ import annotations

import json

from aws_cdk import Aws, CfnCondition, CfnResource, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk.lambda_layer_kubectl_v35 import KubectlV35Layer
from constructs import Construct

from infra import nag


class Cluster(Construct):
    """VPC (private subnets for nodes), EKS with all control-plane logs, a small system node group.

    GPU nodes are not here: Karpenter launches them (see `infra.autoscaling`). The
    system node group runs CoreDNS, Karpenter, KEDA and the dispatcher.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name: str,
        kubernetes_version: str,
        system_instance_type: str,
        system_nodes: int,
        nat_gateways: int,
        api_allowed_cidrs: list[str],
        admin_principal_arns: list[str],
    ) -> None:
        super().__init__(scope, id)
        self._name = name
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=3,  # more AZs, more spot GPU pools to draw from
            nat_gateways=nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                ),
                # VPC CNI gives every pod a VPC address: large private subnets.
                ec2.SubnetConfiguration(
                    name="nodes", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=19
                ),
            ],
            gateway_endpoints={
                # Model downloads and table writes stay off the NAT gateway (free endpoints).
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(
                    service=ec2.GatewayVpcEndpointAwsService.DYNAMODB
                ),
            },
        )
        self.vpc.add_flow_log("FlowLog", traffic_type=ec2.FlowLogTrafficType.REJECT)
        self.node_subnets = self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)

        secrets_key = kms.Key(
            self,
            "SecretsKey",
            description=f"{name}: EKS secrets envelope encryption",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.DESTROY,
        )
        self.kubectl_layer = KubectlV35Layer(self, "KubectlLayer")
        self.cluster = eks.Cluster(
            self,
            "Eks",
            cluster_name=name,
            version=eks.KubernetesVersion.of(kubernetes_version),
            vpc=self.vpc,
            vpc_subnets=[ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)],
            default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
            default_capacity=0,
            endpoint_access=eks.EndpointAccess.PUBLIC_AND_PRIVATE.only_from(*api_allowed_cidrs),
            cluster_logging=[
                eks.ClusterLoggingTypes.API,
                eks.ClusterLoggingTypes.AUDIT,
                eks.ClusterLoggingTypes.AUTHENTICATOR,
                eks.ClusterLoggingTypes.CONTROLLER_MANAGER,
                eks.ClusterLoggingTypes.SCHEDULER,
            ],
            secrets_encryption_key=secrets_key,
            # kubectl 1.35 is within the supported one-minor skew of a 1.34 server.
            kubectl_provider_options=eks.KubectlProviderOptions(kubectl_layer=self.kubectl_layer),
        )
        self.system_nodes = self.cluster.add_nodegroup_capacity(
            "System",
            nodegroup_name=f"{name}-system",
            instance_types=[ec2.InstanceType(system_instance_type)],
            ami_type=eks.NodegroupAmiType.AL2023_X86_64_STANDARD,
            min_size=system_nodes,
            desired_size=system_nodes,
            max_size=system_nodes + 2,
            subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            labels={"sdeks.io/node-pool": "system"},
        )
        _acknowledge_eks_managed(self.cluster, self.system_nodes)
        self.pod_identity_agent = eks.Addon(
            self,
            "PodIdentityAgent",
            # jsii's generated ICluster protocol lists a member Cluster does not expose.
            cluster=self.cluster,  # type: ignore[arg-type]
            addon_name="eks-pod-identity-agent",
        )
        # The VPC CNI as a managed add-on with its network policy agent on: it enforces the
        # NetworkPolicies in front of the runtime pods (infra.netpol).
        self.vpc_cni = eks.Addon(
            self,
            "VpcCni",
            cluster=self.cluster,  # type: ignore[arg-type]
            addon_name="vpc-cni",
            configuration_values={"enableNetworkPolicy": "true"},
        )
        vpc_cni = self.vpc_cni.node.default_child
        assert isinstance(vpc_cni, CfnResource)
        # EKS installs a self-managed vpc-cni with every cluster; the add-on takes it over.
        vpc_cni.add_property_override("ResolveConflicts", "OVERWRITE")
        for i, arn in enumerate(admin_principal_arns):
            self.cluster.grant_access(
                f"Admin{i}",
                arn,
                [
                    eks.AccessPolicy.from_access_policy_name(
                        "AmazonEKSClusterAdminPolicy", access_scope_type=eks.AccessScopeType.CLUSTER
                    )
                ],
            )

    @property
    def name(self) -> str:
        """The literal cluster name (usable as an IAM condition key, unlike the Ref)."""
        return self._name

    def pod_identity_role(
        self, scope: Construct, id: str, *, namespace: str, service_account: str
    ) -> iam.Role:
        """An IAM role that pods of `namespace/service_account` assume via EKS Pod Identity."""
        role = iam.Role(
            scope,
            id,
            description=f"EKS Pod Identity for {namespace}/{service_account}",
            assumed_by=iam.SessionTagsPrincipal(
                iam.ServicePrincipal("pods.eks.amazonaws.com").with_conditions(
                    {"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}
                )
            ),
        )
        # A child of the role: whatever depends on the role (a chart, the workloads)
        # then also waits for the association, without which pods get no credentials.
        association = eks.CfnPodIdentityAssociation(
            role,
            "PodIdentity",
            cluster_name=self.cluster.cluster_name,
            namespace=namespace,
            service_account=service_account,
            role_arn=role.role_arn,
        )
        association.node.add_dependency(self.pod_identity_agent)
        return role


def _acknowledge_eks_managed(cluster: eks.Cluster, system_nodes: eks.Nodegroup) -> None:
    nag.acknowledge(
        cluster.role,
        "EKS requires AmazonEKSClusterPolicy on the cluster role; AWS keeps it in step "
        "with the EKS control plane.",
        nag.managed_policy("AmazonEKSClusterPolicy"),
    )
    nag.acknowledge(
        system_nodes.role,
        "Managed node group nodes need the standard worker policies (kubelet, VPC CNI, "
        "ECR pulls); pods get their own credentials through Pod Identity.",
        *(
            nag.managed_policy(p)
            for p in (
                "AmazonEKSWorkerNodePolicy",
                "AmazonEKS_CNI_Policy",
                "AmazonEC2ContainerRegistryReadOnly",
            )
        ),
    )
    provider = cluster.kubectl_provider
    assert provider is not None, "the kubectl provider applies Helm charts and manifests"
    # The kubectl provider is aws-cdk-lib's own Lambda-backed custom resource: its
    # roles, wildcard on its own function versions and runtime are chosen by CDK.
    nag.acknowledge(
        provider,
        "aws-cdk-lib's kubectl provider (applies Helm charts and manifests) uses the AWS "
        "Lambda execution policies for logging and VPC access.",
        nag.managed_policy("service-role/AWSLambdaBasicExecutionRole"),
        nag.managed_policy("service-role/AWSLambdaVPCAccessExecutionRole"),
    )
    stack = Stack.of(cluster)
    handler = next(c for c in provider.node.find_all() if isinstance(c, lambda_.CfnFunction))
    has_ecr_public = next(c for c in provider.node.find_all() if isinstance(c, CfnCondition))
    ecr_public = {
        "Fn::If": [
            stack.resolve(stack.get_logical_id(has_ecr_public)),
            {
                "Fn::Join": [
                    "",
                    [
                        "arn:",
                        {"Ref": "AWS::Partition"},
                        ":iam::aws:policy/AmazonElasticContainerRegistryPublicReadOnly",
                    ],
                ]
            },
            {"Ref": "AWS::NoValue"},
        ]
    }
    nag.acknowledge(
        provider,
        "aws-cdk-lib's kubectl provider: the handler pulls Helm charts from ECR (public "
        "ECR only when a chart lives there), through AWS managed read-only policies.",
        nag.managed_policy("AmazonEC2ContainerRegistryReadOnly"),
        f"AwsSolutions-IAM4[Policy::{json.dumps(ecr_public, separators=(',', ':'))}]",
    )
    nag.acknowledge(
        provider,
        "aws-cdk-lib's custom-resource framework may invoke any version of its own kubectl "
        "handler function (`<handler arn>:*`), nothing else.",
        f"AwsSolutions-IAM5[Resource::<{stack.resolve(stack.get_logical_id(handler))}.Arn>:*]",
    )
    nag.acknowledge(
        provider,
        "aws-cdk-lib pins the kubectl provider's Lambda runtime to the one the kubectl "
        "layer is built for; upgrading aws-cdk-lib upgrades it.",
        "AwsSolutions-L1",
    )
