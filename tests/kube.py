"""kmock's Kubernetes API emulator for the tests (tests/service/test_kubernetes_executor.py,
tests/deploy/test_container.py): served on 127.0.0.1 from its own event loop thread, with the
official client's APIs ready."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager


@contextmanager
def kmock_cluster():
    """Yields {"emulator", "url", "loop", "api", "batch", "core"}: jobs, pods and services declared."""
    import kmock  # the test extra; imported here so a test module can skip without it
    from kubernetes import client as k8s

    ready, box = threading.Event(), {}

    async def serve():
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for resource in ("batch/v1/jobs", "v1/pods", "v1/services"):
                emulator.resources[resource] = {}
            box.update(emulator=emulator, url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop(),
                       done=asyncio.Event())
            ready.set()
            await box["done"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "kmock did not start"
    api = k8s.ApiClient(k8s.Configuration(host=box["url"]))
    box.update(api=api, batch=k8s.BatchV1Api(api), core=k8s.CoreV1Api(api))
    try:
        yield box
    finally:
        box["loop"].call_soon_threadsafe(box["done"].set)
        thread.join(10)
