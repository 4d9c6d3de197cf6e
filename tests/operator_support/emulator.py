"""kmock's KubernetesEmulator made to behave like a real API server where the operator relies on it.

The stock emulator stores JSON as sent. A real server also: assigns `uid`, `creationTimestamp`
and the namespace from the URL on create; bumps `resourceVersion` on every write and `generation`
when anything but metadata and status changes; ignores `status` in writes to the main resource
and everything but `status` in writes to the `/status` subresource (status subresource enabled);
and serves server-side apply, tracking which field manager owns which field (`ssa`).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from typing import Any

import aiohttp.web
import attrs
import yarl
from kmock import KubernetesEmulator, ResourceInfo, action
from kmock._internal import dicts

from . import ssa

TEST_CLIENT = "distserve-tests"  # the User-Agent of the tests' own kubectl-like client
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}

# (group/version/plural, kind, namespaced, has status subresource)
RESOURCES = [
    ("distserve.io/v1alpha1/distservedeployments", "DistServeDeployment", True, True),
    ("v1/configmaps", "ConfigMap", True, False),
    ("v1/services", "Service", True, True),
    ("v1/pods", "Pod", True, True),
    ("v1/events", "Event", True, False),
    ("v1/namespaces", "Namespace", False, True),
    ("v1/nodes", "Node", False, True),
    ("v1/resourcequotas", "ResourceQuota", True, True),
    ("apps/v1/statefulsets", "StatefulSet", True, True),
    ("apps/v1/deployments", "Deployment", True, True),
    ("batch/v1/jobs", "Job", True, True),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True, False),
    ("scheduling.x-k8s.io/v1alpha1/podgroups", "PodGroup", True, True),
    ("events.k8s.io/v1/events", "Event", True, False),
]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServerEmulator(KubernetesEmulator):
    _rv: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _with_status: set[str] = attrs.field(factory=set, init=False)
    _log: list[tuple[str, str, str]] = attrs.field(factory=list, init=False)
    _agents: list[str] = attrs.field(factory=list, init=False)  # User-Agent of each logged request
    # (resource key, namespace, name) -> field ownership, as metadata.managedFields shows it.
    _managed: dict[tuple[Any, str | None, str], ssa.Managers] = attrs.field(factory=dict, init=False)

    def register_resources(self) -> None:
        for key, kind, namespaced, status in RESOURCES:
            self.resources[key] = ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources={"status"} if status else set()
            )
            if status:
                self._with_status.add(key)

    async def _handle(self, request: Any) -> Any:
        # kmock matches every reaction against its whole request history (by identity), which
        # makes each request O(history): keep only the current one there, and a light log here.
        del self._requests[:-1]
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        content_type = str(request.headers.get("Content-Type", "")).split(";")[0]
        self._log.append((method, str(request.url), content_type))
        self._agents.append(str(request.headers.get("User-Agent", "")))
        if request.resource is not None and isinstance(request.data, dict):
            if method == "PATCH" and content_type == "application/apply-patch+yaml":
                return await self._server_side_apply(request)
            if request.action == action.CREATE:
                self._on_create(request)
            elif request.action == action.UPDATE and request.name is not None:
                self._on_update(request)
        return await super()._handle(request)

    async def _server_side_apply(self, request: Any) -> Any:
        manager = request.params.get("fieldManager")
        if not manager or request.name is None:
            return _status(400, "BadRequest", "fieldManager is required for apply requests")
        config = request.data
        if (config.get("metadata") or {}).get("name") != request.name:
            return _status(400, "BadRequest", "the name of the object does not match the name in the URL")
        key = (request.resource, request.namespace, request.name)
        if self._has_status(request) and request.subresource != "status":
            config.pop("status", None)
        if key not in self.objects or self.objects[key].deleted:
            self._managed[key] = {(manager, "Apply"): ssa.fields(config)}
            config["metadata"]["managedFields"] = ssa.managed_fields(self._managed[key], config["apiVersion"])
            self._on_create(request)
            async with self._lock:
                if key in self.objects:
                    self.objects[key].create(config)
                else:
                    self.objects[key] = config
                await self._buses[request.resource].put({"type": "ADDED", "object": config})
            self._log[-1] = (*self._log[-1][:2], "create")  # an apply that created: RBAC "create"
            return aiohttp.web.json_response(copy.deepcopy(config), status=201)
        live = dict(self.objects[key].raw)
        try:
            new, managers = ssa.apply(
                live, config, self._managed.get(key, {}), manager, force=request.params.get("force") == "true"
            )
        except ssa.Conflict as exc:
            return _status(409, "Conflict", str(exc))
        patch = ssa.merge_patch(live, new)
        if not patch and managers == self._managed.get(key):
            # Nothing changes: like the API server, no write, no new resourceVersion, no event.
            return aiohttp.web.json_response(live)
        patch.setdefault("metadata", {})["managedFields"] = ssa.managed_fields(managers, config["apiVersion"])
        self._managed[key] = managers
        request.data.clear()
        request.data.update(patch)
        self._on_update(request, track=False)
        return await super()._handle(request)

    def _KubernetesEmulator__check(  # overrides kmock's private (name-mangled) matcher
        self, request: Any, resource: Any, namespace: str | None, name: str, strict: bool
    ) -> bool:
        # kmock tests every stored object against each request, resource first (a costly fuzzy
        # comparison): with thousands of objects that dominated the benchmark's emulator time.
        # Same answer, the plain string comparisons first.
        if request.name is not None and name != request.name:
            return False
        if (strict or request.namespace is not None) and namespace != request.namespace:
            return False
        return bool(resource == request.resource)

    async def _serve_list(self, request: Any) -> Any:
        # A real server filters a list by its label selector; kmock returns every object.
        payload = await super()._serve_list(request)
        selector = _selector(request.params.get("labelSelector", ""))
        if selector:
            payload["items"] = [i for i in payload["items"] if _matches(selector, i)]
        return payload

    def _on_create(self, request: Any) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = str(next(self._rv))
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if self._has_status(request):
            request.data.pop("status", None)
        key = (request.resource, meta.get("namespace"), meta.get("name"))
        if "managedFields" not in meta:  # a POST: its manager owns every field it set
            self._managed[key] = ssa.update(None, request.data, {}, _manager(request))
            meta["managedFields"] = ssa.managed_fields(self._managed[key], request.data.get("apiVersion", ""))

    def _on_update(self, request: Any, *, track: bool = True) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the emulator answers 404
        patch = request.data
        if self._has_status(request):
            if request.subresource == "status":
                for k in list(patch):
                    if k not in ("status", "metadata"):
                        patch.pop(k)
                if isinstance(patch.get("metadata"), dict):
                    patch["metadata"] = {k: v for k, v in patch["metadata"].items() if k == "resourceVersion"}
            else:
                patch.pop("status", None)
        current = dict(self.objects[key].raw)
        merged = dicts.patch_dict(current, patch)
        meta = patch.get("metadata")
        if not isinstance(meta, dict):
            meta = patch["metadata"] = {}
        for fixed in ("uid", "creationTimestamp", "name", "namespace"):
            meta.pop(fixed, None)
        essence = {k: v for k, v in merged.items() if k not in ("metadata", "status")}
        before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
        if essence != before:
            meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        meta["resourceVersion"] = str(next(self._rv))
        if track and request.subresource != "status":
            managers = ssa.update(current, merged, self._managed.get(key, {}), _manager(request))
            if managers != self._managed.get(key):
                self._managed[key] = managers
                meta["managedFields"] = ssa.managed_fields(managers, merged.get("apiVersion", ""))

    def _has_status(self, request: Any) -> bool:
        r = request.resource
        key = f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"
        return key in self._with_status

    # ------------------------------------------------------------------ test helpers

    @property
    def log(self) -> list[tuple[str, str, str]]:
        """(method, url, content type) of every request served so far ("create" as the content
        type of an apply that created its object)."""
        return list(self._log)

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, url, _ in self._log if m == method and path_part in url)

    def created(self) -> int:
        """Objects created so far (POST, or an apply that created), Events aside."""
        return sum(
            1
            for m, url, content_type in self._log
            if (m == "POST" or content_type == "create") and "/events" not in url
        )

    def managers(self, key: str, namespace: str, name: str) -> dict[str, set[str]]:
        """Field manager -> the fields it owns (dotted paths) on one stored object."""
        out: dict[str, set[str]] = {}
        for (res, ns, n), managers in self._managed.items():
            if self._key(res) == key and ns == namespace and n == name:
                for (manager, _), paths in managers.items():
                    out.setdefault(manager, set()).update(ssa.render(p) for p in paths)
        return out

    def rbac_requests(self, *, not_from: str = TEST_CLIENT) -> set[tuple[str, str, str]]:
        """(API group, resource[/subresource], verb) of every request served but the test's own
        (User-Agent `not_from`): what the operator's RBAC must allow."""
        out = set()
        for (method, url, content_type), agent in zip(self._log, self._agents, strict=True):
            if agent.startswith(not_from):
                continue
            parsed = yarl.URL(url)
            parts = parsed.path.strip("/").split("/")
            if parts[0] == "api":
                group, rest = "", parts[2:]
            elif parts[0] == "apis" and len(parts) > 3:
                group, rest = parts[1], parts[3:]
            else:
                continue  # discovery
            if rest[:1] == ["namespaces"] and len(rest) > 2:
                rest = rest[2:]
            if not rest or rest[0] == "namespaces":
                continue
            resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
            named = len(rest) > 1
            verb = {
                "GET": (
                    "get" if named else "watch" if parsed.query.get("watch") in ("true", "1") else "list"
                ),
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete",
            }[method]
            out.add((group, resource, verb))
            if content_type == "create":
                out.add((group, resource, "create"))
        return out

    def fetch(self, key: str, namespace: str, name: str) -> dict[str, Any] | None:
        for (res, ns, n), obj in list(self.objects.items()):
            if self._key(res) == key and ns == namespace and n == name and not obj.deleted:
                return copy.deepcopy(dict(obj.raw))
        return None

    def items(self, key: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(dict(obj.raw))
            for (res, ns, _), obj in list(self.objects.items())
            if self._key(res) == key and (namespace is None or ns == namespace) and not obj.deleted
        ]

    @staticmethod
    def _key(res: Any) -> str:
        return f"{res.group}/{res.version}/{res.plural}" if res.group else f"{res.version}/{res.plural}"


def _manager(request: Any) -> str:
    """The manager of a non-apply write: its fieldManager, else (as the real server derives it
    from the user agent) the client's name."""
    agent = str(request.headers.get("User-Agent", "unknown")).split("/")[0]
    return str(request.params.get("fieldManager") or agent)


def _status(code: int, reason: str, message: str) -> Any:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code)


def _selector(text: str) -> list[tuple[str, str, str | None]]:
    """Equality-based label selector terms: (key, op, value), op one of = != exists !exists."""
    terms: list[tuple[str, str, str | None]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            terms.append((k.strip(), "!=", v.strip()))
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            terms.append((k.strip(), "=", v.strip()))
        elif term.startswith("!"):
            terms.append((term[1:], "!exists", None))
        else:
            terms.append((term, "exists", None))
    return terms


def _matches(terms: list[tuple[str, str, str | None]], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, value in terms:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True
