"""The CDK app that deploys sdeks into an AWS account (issue 6); see docs/deploy.md."""
