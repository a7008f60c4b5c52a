"""Container images: built from the repo's Dockerfiles as CDK image assets, or given prebuilt."""

from __future__ import annotations

from pathlib import Path

from aws_cdk import aws_ecr_assets as ecr_assets
from constructs import Construct

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Kept out of the build context (the Dockerfiles copy `pyproject.toml` and the packages).
BUILD_CONTEXT_EXCLUDE = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    ".sdeks",
    "cdk.out",
    "node_modules",
    "outputs",
    "build",
    "dist",
    "tests",
    "benchmarks",
    "docs",
]


class Images(Construct):
    """Image URIs for the dispatcher and the runtime pods.

    A URI given in the config is used as is (a registry the user already pushes
    to, or tests, which have no Docker engine); otherwise the Dockerfile becomes
    an image asset that `cdk deploy` builds and pushes to the bootstrap ECR
    repository. Synth itself never needs Docker.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        dispatcher_image: str | None,
        runtime_image: str | None,
        repo_root: Path = REPO_ROOT,
    ) -> None:
        super().__init__(scope, id)
        self.dispatcher_uri = dispatcher_image or self._asset(
            "Dispatcher", repo_root, "dispatcher/Dockerfile"
        )
        self.runtime_uri = runtime_image or self._asset("Runtime", repo_root, "runtime/Dockerfile")

    def _asset(self, id: str, repo_root: Path, dockerfile: str) -> str:
        asset = ecr_assets.DockerImageAsset(
            self,
            id,
            directory=str(repo_root),
            file=dockerfile,
            exclude=BUILD_CONTEXT_EXCLUDE,
            # EKS nodes here are x86_64 (g5/g6, m7i): build for them even on an arm64 laptop.
            platform=ecr_assets.Platform.LINUX_AMD64,
        )
        return asset.image_uri
