"""NetworkPolicies in front of the runtime pods (docs/security.md, "The pod API").

The pods' HTTP API switches models and renders jobs, so only the dispatcher may
call it; the metrics collector may reach the same port for `/metrics` (it sends
the pod token too). Everything else in the cluster is refused at the network,
and the token refuses what gets past (a misapplied policy, a pod of the same
labels).

Egress of the pods is what they need and no more: the cluster DNS, the EKS Pod
Identity agent on the node (their AWS credentials), and HTTPS to AWS endpoints
(S3 and DynamoDB through the VPC's gateway endpoints, SNS through the NAT
gateway). AWS service addresses are not fixed, so HTTPS is allowed to any
address; no sdeks service listens on 443 inside the cluster.

Enforcement needs a policy engine: on EKS, the VPC CNI's network policy agent
(`enableNetworkPolicy` on the vpc-cni add-on, on by default in the stack's
add-on configuration). Kubelet probes from the pod's own node are allowed by it.
"""

from __future__ import annotations

from infra import k8s
from infra.collector import COLLECTOR

#: EKS Pod Identity agent: a link-local address on every node, port 80.
POD_IDENTITY_AGENT = ("169.254.170.23/32", 80)
RUNTIME_POLICY = "sdeks-runtime-lockdown"


def _pods(name: str) -> dict[str, object]:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}


def runtime_policy(*, namespace: str) -> k8s.Manifest:
    """Every runtime pod (all runtimes): ingress from the dispatcher and the collector on
    the API port only; egress to DNS, the Pod Identity agent and HTTPS."""
    api_port = [{"protocol": "TCP", "port": k8s.RUNTIME_PORT}]
    cidr, agent_port = POD_IDENTITY_AGENT
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": RUNTIME_POLICY,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": k8s.PART_OF},
        },
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "sdeks-runtime"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [_pods(k8s.DISPATCHER), _pods(COLLECTOR)], "ports": api_port},
            ],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                {
                    "to": [{"ipBlock": {"cidr": cidr}}],
                    "ports": [{"protocol": "TCP", "port": agent_port}],
                },
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                    "ports": [{"protocol": "TCP", "port": 443}],
                },
            ],
        },
    }
