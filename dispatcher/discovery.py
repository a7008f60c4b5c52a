"""Finding a runtime's pods: static URLs, or the ready endpoints of its
headless Service from Kubernetes EndpointSlices (list, then watch).

A discovery's `run(on_change)` calls ``on_change(runtime, urls)`` with the
complete set of pod URLs of a runtime each time it changes, on the event
loop's thread. The `kubernetes` client is synchronous, so each runtime's
list+watch runs in a daemon thread and hands results to the loop with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

OnChange = Callable[[str, set[str]], None]

#: Label every EndpointSlice of a Service carries.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class StaticDiscovery:
    def __init__(self, pods: Mapping[str, Sequence[str]]) -> None:
        self._pods = {runtime: set(urls) for runtime, urls in pods.items()}

    async def run(self, on_change: OnChange) -> None:
        for runtime, urls in self._pods.items():
            on_change(runtime, set(urls))


def slice_urls(endpoint_slice: Any, *, port_name: str, scheme: str = "http") -> set[str]:
    """Pod URLs of one EndpointSlice: its ready endpoints on the named port (else the first)."""
    ports = list(getattr(endpoint_slice, "ports", None) or [])
    port = next((p.port for p in ports if p.name == port_name and p.port), None)
    if port is None:
        port = next((p.port for p in ports if p.port), None)
    if port is None:
        return set()
    urls = set()
    for endpoint in getattr(endpoint_slice, "endpoints", None) or []:
        conditions = endpoint.conditions
        # The API says an unset `ready` means ready; a terminating pod turns it false.
        ready = conditions is None or conditions.ready is None or conditions.ready
        if not ready:
            continue
        for address in endpoint.addresses or []:
            host = f"[{address}]" if ":" in address else address
            urls.add(f"{scheme}://{host}:{port}")
    return urls


class KubernetesDiscovery:
    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        services: Mapping[str, str],
        port_name: str = "http",
        watch_timeout_s: int = 300,
        retry_s: float = 2.0,
    ) -> None:
        self._api_client = api_client
        self.namespace = namespace
        self.services = dict(services)
        self.port_name = port_name
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._watches: list[Any] = []

    @classmethod
    def from_settings(cls, settings: Any) -> KubernetesDiscovery:
        from kubernetes import client, config

        if settings.kubernetes_api_url:
            configuration = client.Configuration()
            configuration.host = settings.kubernetes_api_url
            api_client = client.ApiClient(configuration)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        return cls(
            api_client,
            namespace=settings.kubernetes_namespace,
            services={r: settings.service_name(r) for r in settings.queues},
            port_name=settings.kubernetes_port_name,
        )

    async def run(self, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()
        threads = []
        for runtime, service in self.services.items():

            def emit(urls: set[str], runtime: str = runtime) -> None:
                loop.call_soon_threadsafe(on_change, runtime, urls)

            thread = threading.Thread(
                target=self._watch, args=(service, emit), name=f"eps-{runtime}", daemon=True
            )
            thread.start()
            threads.append(thread)
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            for watch in self._watches:
                watch.stop()

    def _watch(self, service: str, emit: Callable[[set[str]], None]) -> None:
        """List, then watch from the list's resourceVersion; relist whenever the watch ends."""
        from kubernetes import client, watch

        api = client.DiscoveryV1Api(self._api_client)
        selector = f"{SERVICE_NAME_LABEL}={service}"
        while not self._stop.is_set():
            try:
                listing: Any = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector, _request_timeout=30
                )
                slices = {
                    item.metadata.name: slice_urls(item, port_name=self.port_name)
                    for item in listing.items
                }
                emit(set().union(*slices.values()))
                w = watch.Watch()
                self._watches.append(w)
                event: dict[str, Any]
                for event in w.stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=self.watch_timeout_s,
                    _request_timeout=self.watch_timeout_s + 10,
                ):
                    if self._stop.is_set():
                        break
                    kind, obj = event["type"], event["object"]  # obj: V1EndpointSlice
                    name = obj.metadata.name
                    if kind in ("ADDED", "MODIFIED"):
                        slices[name] = slice_urls(obj, port_name=self.port_name)
                    elif kind == "DELETED":
                        slices.pop(name, None)
                    else:
                        continue
                    emit(set().union(*slices.values()))
                self._watches.remove(w)
            except Exception:  # the API server restarts, tokens rotate: relist after a pause
                if self._stop.is_set():
                    return
                log.warning("EndpointSlice watch of %s failed; relisting", service, exc_info=True)
                self._stop.wait(self.retry_s)
