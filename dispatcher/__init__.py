"""The dispatcher: consumes the task queues, resolves image links, and routes
each task to a runtime pod by model affinity while holding its SQS lease.

Modules, outermost first:

    __main__.py   entry point (`python -m dispatcher`): settings, logging, signals
    app.py        wiring: builds the clients and sessions, injects them, runs
    service.py    the consumer: receive loops, one coroutine per held message, drain
    queues.py     the queues consumed (maxReceiveCount, visibility) and their windows
    leases.py     SQS leases: batched visibility heartbeats, delete, release
    routing.py    the scheduling shell: waiting tasks + pod views -> policy -> pods
    scheduler.py  the pure scheduling policies (affinity, FIFO)
    simulator.py  a deterministic discrete-event simulator for those policies
    pods.py       the pod HTTP client and what the dispatcher knows of each pod
    discovery.py  static pod URLs or Kubernetes EndpointSlices
    links.py      SSRF-safe resolution of http(s):// and s3:// image links
    webhooks.py   the `webhooks` queue consumer (signed delivery, same SSRF guard)
    metrics.py    Prometheus metrics
    settings.py   `SDEKS_*` configuration
    errors.py     dispatcher-side errors

Importing this package imports nothing heavy (no torch, no AWS clients).
"""
