"""The pod's HTTP routes, one `APIRouter` per API.

- `routes.ops`: health, metrics, `/v1/state` (operations and the dispatcher's discovery)
- `routes.jobs`: the job API the dispatcher calls (`/v1/jobs`, cancel, prefetch)
- `routes.sdapi`: A1111's `/sdapi/v1/*`
"""
