"""Server-side apply as the API server does it, for the emulator: field ownership per manager.

Every write records which field manager owns which field. An *apply* (PATCH with
`application/apply-patch+yaml`) declares the manager's whole intent: fields it set before and
leaves out now are removed unless another manager owns them; fields it sets that another
manager owns with a different value conflict (409) unless `force=true`, which takes them over.
An *update* (POST, PUT, merge PATCH) takes over every field whose value it changes.

A field is a path of map keys, with list items of an associative list (items keyed by `uid`,
`name`, `mountPath` or `containerPort`, as Kubernetes' schemas key containers, env, volumes,
ports and ownerReferences) addressed by their key; other lists are atomic, owned whole.
Simplified from the real structured-merge-diff, enough for what the operator writes.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Iterator, Mapping
from typing import Any

# An item of an associative list: ("k", key field, key value).
Item = tuple[str, str, Any]
Path = tuple[str | Item, ...]
Managers = dict[tuple[str, str], set[Path]]  # (manager, "Apply" | "Update") -> owned fields

MERGE_KEYS = ("uid", "name", "mountPath", "containerPort")
UNTRACKED_META = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "selfLink",
}
MISSING = object()


class Conflict(Exception):
    def __init__(self, fields: list[tuple[Path, str]]):
        self.fields = fields
        listed = "; ".join(f'conflict with "{m}": {render(p)}' for p, m in fields)
        super().__init__(f"Apply failed with {len(fields)} conflict(s): {listed}")


def render(path: Path) -> str:
    return ".".join(f"[{seg[1]}={seg[2]}]" if isinstance(seg, tuple) else seg for seg in path)


def _merge_key(items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, Mapping) for i in items):
        return None
    for key in MERGE_KEYS:
        values = [i.get(key) for i in items]
        if all(v is not None for v in values) and len(set(map(str, values))) == len(values):
            return key
    return None


def fields(obj: Mapping[str, Any]) -> set[Path]:
    """The fields an object (or an applied configuration) sets."""
    out: set[Path] = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata" and isinstance(value, Mapping):
            for mk, mv in value.items():
                if mk not in UNTRACKED_META:
                    out.update(_walk(mv, ("metadata", mk)))
            continue
        out.update(_walk(value, (key,)))
    return out


def _walk(value: Any, prefix: Path) -> Iterator[Path]:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _walk(v, (*prefix, k))
    elif isinstance(value, list) and (key := _merge_key(value)) is not None:
        for item in value:
            seg: Item = ("k", key, item[key])
            yield (*prefix, seg)
            for k, v in item.items():
                yield from _walk(v, (*prefix, seg, k))
    else:
        yield prefix


def _child(node: Any, seg: str | Item) -> Any:
    if isinstance(seg, tuple):
        if not isinstance(node, list):
            return MISSING
        return next((i for i in node if isinstance(i, Mapping) and i.get(seg[1]) == seg[2]), MISSING)
    return node.get(seg, MISSING) if isinstance(node, Mapping) else MISSING


def value_at(obj: Any, path: Path) -> Any:
    node = obj
    for seg in path:
        node = _child(node, seg)
        if node is MISSING:
            return MISSING
    # An item's own entry stands for the item's presence, not its contents.
    return True if path and isinstance(path[-1], tuple) else node


def _remove(obj: Any, path: Path) -> None:
    parent = obj
    for seg in path[:-1]:
        parent = _child(parent, seg)
        if parent is MISSING:
            return
    last = path[-1]
    if isinstance(last, tuple):
        if isinstance(parent, list):
            parent[:] = [i for i in parent if not (isinstance(i, Mapping) and i.get(last[1]) == last[2])]
    elif isinstance(parent, dict):
        parent.pop(last, None)


def _merge(live: Any, config: Any) -> Any:
    if isinstance(live, dict) and isinstance(config, Mapping):
        out = dict(live)
        for k, v in config.items():
            out[k] = _merge(live[k], v) if k in live else copy.deepcopy(v)
        return out
    key = _merge_key(config) if isinstance(live, list) and isinstance(config, list) else None
    if key is not None and (not live or _merge_key(live) == key):
        out_list = [copy.deepcopy(i) for i in live]
        for item in config:
            at = next((n for n, i in enumerate(out_list) if i.get(key) == item[key]), None)
            if at is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[at] = _merge(out_list[at], item)
        return out_list
    return copy.deepcopy(config)


def apply(
    live: Mapping[str, Any], config: Mapping[str, Any], managers: Managers, manager: str, *, force: bool
) -> tuple[dict[str, Any], Managers]:
    """The object after `manager` applies `config`, and who owns what then; Conflict if refused."""
    me = (manager, "Apply")
    declared = fields(config)
    others = {m: set(ps) for m, ps in managers.items() if m != me}
    conflicts = [
        (p, m[0])
        for m, ps in others.items()
        for p in sorted(declared & ps, key=render)
        if value_at(live, p) != value_at(config, p)
    ]
    if conflicts and not force:
        raise Conflict(conflicts)
    for p, m in conflicts:
        for key in [k for k in others if k[0] == m]:
            others[key].discard(p)
    kept = set().union(*others.values()) if others else set()
    released = managers.get(me, set()) - declared - kept
    result = copy.deepcopy(dict(live))
    owned = kept | declared
    for path in sorted(released, key=len, reverse=True):
        if len(path) > 1 and isinstance(path[-2], tuple) and path[-1] == path[-2][1]:
            continue  # an item's key goes with the item
        if any(len(p) > len(path) and p[: len(path)] == path for p in owned):
            continue  # an item stays while anyone owns a field inside it
        _remove(result, path)
        # Containers the removal emptied go too, unless someone owns something in them.
        for cut in range(len(path) - 1, 0, -1):
            parent = value_at(result, path[:cut])
            if parent in ({}, []) and not any(p[:cut] == path[:cut] for p in owned):
                _remove(result, path[:cut])
            else:
                break
    result = _merge(result, {k: v for k, v in config.items() if k != "status"})
    updated = {m: ps for m, ps in others.items() if ps}
    updated[me] = declared
    return result, updated


def update(
    before: Mapping[str, Any] | None, after: Mapping[str, Any], managers: Managers, manager: str
) -> Managers:
    """Ownership after an update by `manager` turned `before` (None: a create) into `after`."""
    old = fields(before) if before is not None else set()
    new = fields(after)
    changed = {p for p in new if p not in old or value_at(before, p) != value_at(after, p)}
    gone = old - new
    out = {m: ps - changed - gone for m, ps in managers.items()}
    me = (manager, "Update")
    out[me] = out.get(me, set()) | changed
    return {m: ps for m, ps in out.items() if ps}


def merge_patch(live: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `live` into `new` (None deletes a key)."""
    out: dict[str, Any] = {}
    for key in live:
        if key not in new:
            out[key] = None
    for key, value in new.items():
        old = live.get(key, MISSING)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            sub = merge_patch(old, value)
            if sub:
                out[key] = sub
        elif old is MISSING or old != value:
            out[key] = copy.deepcopy(value)
    return out


def managed_fields(managers: Managers, api_version: str) -> list[dict[str, Any]]:
    """`metadata.managedFields` as the API server writes it (FieldsV1)."""
    now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries = []
    for (manager, operation), paths in sorted(managers.items()):
        tree: dict[str, Any] = {}
        for path in paths:
            node = tree
            for seg in path:
                name = (
                    f"k:{json.dumps({seg[1]: seg[2]}, separators=(',', ':'))}"
                    if isinstance(seg, tuple)
                    else f"f:{seg}"
                )
                node = node.setdefault(name, {})
            if path and isinstance(path[-1], tuple):
                node["."] = {}
        entries.append(
            {
                "manager": manager,
                "operation": operation,
                "apiVersion": api_version,
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": tree,
            }
        )
    return entries
