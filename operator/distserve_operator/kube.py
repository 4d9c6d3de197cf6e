"""Every Kubernetes API call the operator makes (besides kopf's own watching and patching).

The `kubernetes` library's API client does the transport: TLS, client certificates, kubeconfig
exec plugins, and the in-cluster service-account token, which it re-reads as the token rotates.
That client blocks, so its calls run in a small thread pool and kopf's event loop never waits
on the network. Resource paths come from `PLURALS`, the table of every kind the operator touches
(the chart's RBAC follows it); the operator needs no discovery round trips.

Children are written with **server-side apply** under the field manager `distserve-operator`
(settings.field_manager): one PATCH per child, no GET and compare. The API server merges what we
render into the live object and records which manager owns which field, so a field the operator
stops rendering is removed while fields others own stay: a user's label, or, with autoscaling
mode External, the replica count an HPA or KEDA sets. Objects are adopted (ownerReferences) so
the garbage collector removes them with their owner.

API errors become kopf's vocabulary: `TemporaryError` to retry later.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from . import labels as L

logger = logging.getLogger(__name__)

# (apiVersion, kind) -> plural. Every kind the operator reads or writes; the chart's RBAC follows it.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "ResourceQuota"): "resourcequotas",
    ("v1", "Event"): "events",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("apps/v1", "Deployment"): "deployments",
    # Profiling Jobs (profile_jobs.py): shared by deployments of one model, so never pruned.
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): "podgroups",
    ("distserve.io/v1alpha1", "DistServeDeployment"): "distservedeployments",
}
# Kinds pruned when no longer rendered (a smaller pp leaves stage StatefulSets behind, ...).
PRUNABLE = [
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"),
]
APPLY = "application/apply-patch+yaml"  # JSON is YAML: the body goes as JSON
MERGE = "application/merge-patch+json"
# With autoscaling mode External the operator sets a new StatefulSet's replicas once, under this
# second manager, and never again: the HPA takes the field over when it first scales. Were the
# operator's own manager to set it and later drop it, the server would remove the field and the
# StatefulSet would fall back to 1 replica.
INITIAL_REPLICAS_SUFFIX = "-initial-replicas"


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"HTTP {status}: {message}")


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    plural = PLURALS[(api_version, kind)]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{root}/{plural}"


def object_path(api_version: str, kind: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


def load_configuration(api_server: str | None) -> k8s.Configuration:
    """The client's credentials: `api_server` (plain, no auth: an emulator), else the pod's
    service account (its token re-read as it rotates), else the kubeconfig."""
    configuration = k8s.Configuration()
    if api_server:
        configuration.host = api_server.rstrip("/")
        configuration.verify_ssl = False
        return configuration
    try:
        k8s_config.load_incluster_config(client_configuration=configuration, try_refresh_token=True)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration, persist_config=False)
    return configuration


@dataclass
class Applied:
    action: str  # created | applied
    obj: dict[str, Any]


def without_replicas(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}


class Kube:
    """The API client; one per operator (in `memo`)."""

    def __init__(
        self,
        *,
        field_manager: str,
        api_server: str | None = None,
        timeout: float = 30.0,
        threads: int = 8,
        configure: Callable[[str | None], k8s.Configuration] = load_configuration,
    ) -> None:
        self.field_manager = field_manager
        self.timeout = timeout
        self._api_server = api_server
        self._configure = configure
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._client: k8s.ApiClient | None = None
        self._client_lock = threading.Lock()
        self._closed = False
        self._plain_session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ transport

    def _api(self) -> k8s.ApiClient:
        # Worker threads race here on the first requests: one client, made once.
        with self._client_lock:
            if self._client is None:
                configuration = self._configure(self._api_server)
                # One pooled connection per thread, so no request waits for a connection.
                configuration.connection_pool_maxsize = self._threads
                self._client = k8s.ApiClient(configuration)
            return self._client

    def _reload(self, stale: k8s.ApiClient) -> None:
        """New credentials after a 401 (an expired kubeconfig exec token, a replaced secret).
        Only the client that got the 401 is replaced: a thread that already did so wins."""
        with self._client_lock:
            if self._client is stale:
                self._client = None
        stale.close()

    def _send(
        self, method: str, path: str, body: Any, query: list[tuple[str, str]], content_type: str
    ) -> tuple[int, Any]:
        """One request, in a worker thread: (status, decoded JSON body); ApiError on >= 400."""
        for attempt in (0, 1):
            api = self._api()
            headers = {"Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = content_type
            method_, url, headers, body_, _ = api.param_serialize(
                method,
                path,
                query_params=query,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = api.call_api(
                method_, url, header_params=headers, body=body_, _request_timeout=self.timeout
            )
            raw = response.read()
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            if response.status == 401 and attempt == 0:
                self._reload(api)
                continue
            if response.status >= 400:
                raise ApiError(response.status, data)
            return response.status, data
        raise AssertionError("unreachable")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        if self._closed:
            raise kopf.TemporaryError("the operator is shutting down", delay=1)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="kube")
        call = functools.partial(self._send, method, path, body, list((params or {}).items()), content_type)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except ApiError:
            raise
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise kopf.TemporaryError(f"{method} {path}: {exc}", delay=5) from exc

    # ------------------------------------------------------------------ objects

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            _, result = await self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise self._map(exc, f"get {kind} {name}") from exc
        return result  # type: ignore[no-any-return]

    async def list_objects(
        self, api_version: str, kind: str, namespace: str | None, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
        try:
            _, data = await self.request("GET", collection_path(api_version, kind, namespace), params=params)
        except ApiError as exc:
            if exc.status == 404:  # the kind is not served (e.g. no scheduler-plugins CRDs)
                return []
            raise self._map(exc, f"list {kind}") from exc
        items = (data.get("items") or []) if isinstance(data, dict) else []
        # Filter here as well: selectors are cheap to re-check and some servers ignore them.
        return [
            {"apiVersion": api_version, "kind": kind, **i}
            for i in items
            if all((i.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in selector.items())
        ]

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        """A JSON merge patch of a few fields (a scale-down of an old revision, a pod's gates)."""
        path = object_path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        try:
            _, result = await self.request(
                "PATCH", path, body=patch, content_type=MERGE, params={"fieldManager": self.field_manager}
            )
        except ApiError as exc:
            raise self._map(exc, f"patch {kind} {name}") from exc
        return result  # type: ignore[no-any-return]

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            await self.request(
                "DELETE",
                object_path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status != 404:
                raise self._map(exc, f"delete {kind} {name}") from exc

    async def _server_side_apply(
        self, obj: dict[str, Any], manager: str, *, force: bool
    ) -> tuple[int, dict[str, Any]]:
        meta = obj["metadata"]
        status, result = await self.request(
            "PATCH",
            object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]),
            body=obj,
            content_type=APPLY,
            params={"fieldManager": manager, "force": "true" if force else "false"},
        )
        return status, result

    async def apply(self, obj: dict[str, Any], *, preserve_replicas: bool = False) -> Applied:
        """Server-side apply: create the object or bring the fields the operator owns to `obj`.

        `force`: the operator's rendering wins over a manager that changed one of its fields
        (a hand edit of a worker's image); fields the operator does not render stay as they are.
        `preserve_replicas`: the operator does not own `spec.replicas` (an HPA does); a new
        object gets `obj`'s count once, under the hand-over manager (INITIAL_REPLICAS_SUFFIX)."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        hand_over = preserve_replicas and "replicas" in (obj.get("spec") or {})
        try:
            status, result = await self._server_side_apply(
                without_replicas(obj) if hand_over else obj, self.field_manager, force=True
            )
            if hand_over and status == 201:
                replicas = {
                    "apiVersion": obj["apiVersion"],
                    "kind": kind,
                    "metadata": {"name": name, "namespace": obj["metadata"].get("namespace")},
                    "spec": {"replicas": obj["spec"]["replicas"]},
                }
                try:
                    _, result = await self._server_side_apply(
                        replicas, self.field_manager + INITIAL_REPLICAS_SUFFIX, force=False
                    )
                except ApiError as exc:
                    if exc.status != 409:  # 409: an autoscaler set it first, and it wins
                        raise
        except ApiError as exc:
            raise self._map(exc, f"apply {kind} {name}") from exc
        return Applied("created" if status == 201 else "applied", result)

    async def create(self, obj: dict[str, Any], *, exist_ok: bool = False) -> dict[str, Any] | None:
        """POST a new object that is never changed afterwards (a profiling Job: its spec is
        immutable, and RBAC grants no patch on Jobs); children go through `apply`.
        `exist_ok`: None, not an error, when it exists already (another reconcile made it)."""
        meta = obj["metadata"]
        try:
            _, result = await self.request(
                "POST",
                collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                body=obj,
                params={"fieldManager": self.field_manager},
            )
        except ApiError as exc:
            if exc.status == 409 and exist_ok:
                return None
            raise self._map(exc, f"create {obj['kind']} {meta.get('name', '')}") from exc
        return result  # type: ignore[no-any-return]

    async def try_list(
        self, api_version: str, kind: str, namespace: str | None, selector: Mapping[str, str]
    ) -> list[dict[str, Any]] | None:
        """Like list_objects, but None where RBAC forbids it (optional knowledge, such as nodes)."""
        try:
            return await self.list_objects(api_version, kind, namespace, selector)
        except kopf.TemporaryError as exc:
            if isinstance(exc.__cause__, ApiError) and exc.__cause__.status in (401, 403):
                return None
            raise

    async def prune(
        self,
        namespace: str,
        instance: str,
        owner_uid: str,
        keep: Iterable[tuple[str, str, str]],
        *,
        keep_if: Callable[[dict[str, Any]], bool] | None = None,
        pod_groups: bool = True,
    ) -> list[str]:
        """Delete children of this owner that are no longer rendered (and `keep_if` does not keep:
        the groups of a rollout's old revision); returns 'Kind/name' deleted. `pod_groups`: the
        operator may have made PodGroups (settings.gang_scheduling; the chart grants RBAC on them
        only then, so without it they are not even listed)."""
        keep_set = set(keep)
        deleted = []
        for api_version, kind in PRUNABLE:
            if kind == "PodGroup" and not pod_groups:
                continue
            for item in await self.list_objects(api_version, kind, namespace, L.owned_selector(instance)):
                meta = item.get("metadata", {})
                owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
                if owner_uid not in owners or (api_version, kind, meta.get("name")) in keep_set:
                    continue
                if keep_if is not None and keep_if(item):
                    continue
                await self.delete(api_version, kind, namespace, meta["name"])
                deleted.append(f"{kind}/{meta['name']}")
        return deleted

    @staticmethod
    def _map(exc: ApiError, what: str) -> Exception:
        if exc.status in (400, 403, 409, 422):
            # A rejected object, missing RBAC, or a field another manager holds: retrying quickly
            # will not help, but a fixed Role or CRD will, so retry slowly instead of giving up.
            return kopf.TemporaryError(f"{what}: {exc}", delay=60)
        return kopf.TemporaryError(f"{what}: {exc}", delay=5)

    # ------------------------------------------------------------------ the custom resource

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.patch(
            "distserve.io/v1alpha1",
            "DistServeDeployment",
            namespace,
            name,
            {"status": patch},
            subresource="status",
        )

    # ------------------------------------------------------------------ not the API server

    async def get_text(self, url: str, timeout: float) -> str:
        """Plain HTTP GET (router /metrics); not through the API server."""
        session = await self._plain()
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            resp.raise_for_status()
            return await resp.text()

    async def get_json(self, url: str, params: Mapping[str, str], timeout: float) -> Any:
        session = await self._plain()
        async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def _plain(self) -> aiohttp.ClientSession:
        if self._closed:
            raise kopf.TemporaryError("the operator is shutting down", delay=1)
        if self._plain_session is None or self._plain_session.closed:
            self._plain_session = aiohttp.ClientSession()
        return self._plain_session

    async def close_all(self) -> None:
        self._closed = True
        if self._executor is not None:
            # Requests in flight finish (bounded by the timeout); nothing new starts.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            self._executor = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._plain_session is not None:
            await self._plain_session.close()
            self._plain_session = None
