"""sdeks: Stable Diffusion inference as an event-driven AWS pipeline.

This package holds the wire contract (envelope, job, callback), the resource
names shared by the CDK app and the local stack, the `sdeks` CLI and the
embedded local stack. It never imports torch.
"""

__version__ = "0.1.0"
