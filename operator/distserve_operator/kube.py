"""Every Kubernetes API call the operator makes (besides kopf's own watching and patching).

An aiohttp client over the same credentials kopf logged in with. Children are applied
idempotently: GET, then CREATE when absent or a JSON merge PATCH when the live object differs
from the rendered one; a CREATE that loses a race (409) falls back to the PATCH. Objects are
adopted (ownerReferences) so Kubernetes' garbage collector removes them with their owner.
API errors become kopf's vocabulary: `TemporaryError` to retry later, `PermanentError` to stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from . import labels as L

logger = logging.getLogger(__name__)

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# (apiVersion, kind) -> plural. Every kind the operator writes; RBAC in docs/operator.md follows it.
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


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"HTTP {status}: {message}")


def _temporary(exc: Exception, what: str) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"{what}: {exc}", delay=5)


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    plural = PLURALS[(api_version, kind)]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{root}/{plural}"


def object_path(api_version: str, kind: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


def is_subset(desired: Any, live: Any) -> bool:
    """Whether `live` already has every field of `desired` (servers add defaults, never remove)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and is_subset(v, live[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired == live) or (isinstance(desired, int | float) and str(desired) == str(live))


@dataclass
class Applied:
    action: str  # created | patched | unchanged
    obj: dict[str, Any]


class Kube:
    """The API client; one per operator (in `memo`), connected by the login handler."""

    def __init__(self, *, field_manager: str, timeout: float = 30.0) -> None:
        self.field_manager = field_manager
        self.timeout = timeout
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_read = 0.0
        self._tmp: list[str] = []
        self._retired: list[aiohttp.ClientSession] = []
        self._closed = False

    # ------------------------------------------------------------------ connection

    def connect(self, info: kopf.ConnectionInfo) -> None:
        """Use these credentials (called again on re-login; the next request reconnects)."""
        if self._info != info:
            self._info = info
            if self._session is not None:
                self._retired.append(self._session)  # closed at shutdown; requests in flight finish
            self._session = None

    @property
    def server(self) -> str:
        if self._info is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        return self._info.server.rstrip("/")

    def _ssl(self, info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
        if not info.server.startswith("https"):
            return False
        if info.insecure:
            return False
        ctx = ssl.create_default_context(
            cafile=os.fspath(info.ca_path) if info.ca_path else None,
            cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
        )
        cert, key = info.certificate_path, info.private_key_path
        if info.certificate_data and info.private_key_data:
            cert, key = self._write_tmp(info.certificate_data), self._write_tmp(info.private_key_data)
        if cert and key:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        return ctx

    def _write_tmp(self, data: str | bytes) -> str:
        fd, path = tempfile.mkstemp(prefix="distserve-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        self._tmp.append(path)
        return path

    def _auth_header(self) -> dict[str, str]:
        info = self._info
        if info is None:
            return {}
        token = info.token
        # A projected service-account token rotates under us: re-read it every minute.
        if token and os.path.exists(SA_TOKEN) and time.monotonic() - self._token_read > 60:
            with open(SA_TOKEN, encoding="utf-8") as f:
                self._token = f.read().strip() or token
            self._token_read = time.monotonic()
        token = self._token or token
        if token:
            return {"Authorization": f"{info.scheme or 'Bearer'} {token}"}
        if info.username and info.password:
            return {"Authorization": aiohttp.BasicAuth(info.username, info.password).encode()}
        return {}

    async def _sess(self) -> aiohttp.ClientSession:
        if self._closed:
            raise kopf.TemporaryError("the operator is shutting down", delay=1)
        if self._session is None or self._session.closed:
            if self._info is None:
                raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
            connector = aiohttp.TCPConnector(ssl=self._ssl(self._info), limit=20)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        for session in [*self._retired, *([self._session] if self._session else [])]:
            await session.close()
        self._session = None
        self._retired.clear()
        for path in self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._tmp.clear()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json", **self._auth_header()}
        if body is not None:
            headers["Content-Type"] = content_type
        session = await self._sess()
        try:
            async with session.request(method, url, json=body, headers=headers) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = await resp.text()
                if resp.status >= 400:
                    raise ApiError(resp.status, data)
                return data
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _temporary(exc, f"{method} {path}") from exc

    # ------------------------------------------------------------------ objects

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request(
                "GET", object_path(api_version, kind, namespace, name)
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise self._map(exc, f"get {kind} {name}") from exc
        return result

    async def list_objects(
        self, api_version: str, kind: str, namespace: str | None, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
        try:
            data = await self.request("GET", collection_path(api_version, kind, namespace), params=params)
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

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        result: dict[str, Any] = await self.request(
            "POST",
            collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
            body=obj,
            params={"fieldManager": self.field_manager},
        )
        return result

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
        path = object_path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        try:
            result: dict[str, Any] = await self.request(
                "PATCH",
                path,
                body=patch,
                content_type="application/merge-patch+json",
                params={"fieldManager": self.field_manager},
            )
        except ApiError as exc:
            raise self._map(exc, f"patch {kind} {name}") from exc
        return result

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

    async def apply(
        self, obj: dict[str, Any], *, preserve_replicas: bool = False, create_first: bool = False
    ) -> Applied:
        """Create the object or bring the live one to it; harmless to repeat.

        `preserve_replicas`: leave `spec.replicas` of a live object alone (an HPA owns it).
        `create_first`: the object most likely does not exist yet (a new deployment's children):
        try to create it before looking (one request, not two); if it exists, patch it as usual."""
        api_version, kind, meta = obj["apiVersion"], obj["kind"], obj["metadata"]
        namespace, name = meta.get("namespace"), meta["name"]
        for attempt in range(3):
            live = (
                None if create_first and attempt == 0 else await self.get(api_version, kind, namespace, name)
            )
            if live is None:
                try:
                    return Applied("created", await self.create(obj))
                except ApiError as exc:
                    if exc.status == 409:
                        continue  # created meanwhile (a concurrent reconcile): patch it instead
                    raise self._map(exc, f"create {kind} {name}") from exc
            desired = obj
            if preserve_replicas and "replicas" in (live.get("spec") or {}):
                desired = {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}
            if is_subset(desired, live):
                return Applied("unchanged", live)
            return Applied("patched", await self.patch(api_version, kind, namespace, name, desired))
        raise kopf.TemporaryError(f"{kind} {name} keeps changing under the operator; retrying", delay=2)

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
    ) -> list[str]:
        """Delete children of this owner that are no longer rendered (and `keep_if` does not keep:
        the groups of a rollout's old revision); returns 'Kind/name' deleted."""
        keep_set = set(keep)
        deleted = []
        for api_version, kind in PRUNABLE:
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
        if exc.status in (400, 403, 422):
            # A rejected object or missing RBAC: retrying quickly will not help, but a fixed
            # Role or CRD will, so retry slowly instead of giving up for good.
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

    _plain_session: aiohttp.ClientSession | None = None

    async def _plain(self) -> aiohttp.ClientSession:
        if self._closed:
            raise kopf.TemporaryError("the operator is shutting down", delay=1)
        if self._plain_session is None or self._plain_session.closed:
            self._plain_session = aiohttp.ClientSession()
        return self._plain_session

    async def close_all(self) -> None:
        await self.close()
        if self._plain_session is not None:
            await self._plain_session.close()
            self._plain_session = None
