"""Label and annotation keys the operator writes: one place, so selectors and children agree."""

from __future__ import annotations

APP_NAME = "app.kubernetes.io/name"
APP_INSTANCE = "app.kubernetes.io/instance"
APP_COMPONENT = "app.kubernetes.io/component"
APP_MANAGED_BY = "app.kubernetes.io/managed-by"
ROLE = "distserve.io/role"
STAGE = "distserve.io/stage"
# A pod that serves a role carries `distserve.io/serves-<role>: "true"`; the SharedPod layout
# runs both roles in one pod, so the headless Services select on these rather than on ROLE.
SERVES_PREFILL = "distserve.io/serves-prefill"
SERVES_DECODE = "distserve.io/serves-decode"
POD_GROUP = "scheduling.x-k8s.io/pod-group"
# The shape (parallelism hash) of a plan's worker objects: a re-plan that changes it brings up new
# groups beside the old ones (rollout.py), told apart by this label and a name suffix.
REVISION = "distserve.io/revision"

PLAN_HASH_ANNOTATION = "distserve.io/parallelism-hash"
# Stored latency profiles and the Jobs measuring them (profiling.py): shared by every deployment of
# one model, GPU type and dtype in a namespace, so they carry no instance label and no owner.
PROFILE_KEY = "distserve.io/profile-key"  # hash of (model, GPU type, dtype): selects Jobs and pods
PROFILE_MODEL = "distserve.io/profile-model"  # label: sanitised; annotation: the full value
PROFILE_GPU = "distserve.io/profile-gpu"
PROFILE_DTYPE = "distserve.io/profile-dtype"
PROFILE_ATTEMPT = "distserve.io/profile-attempt"
KOPF_PREFIX = "distserve.io"

NAME_VALUE = "distserve"
MANAGER_VALUE = "distserve-operator"

COMPONENT_WORKER = "worker"
COMPONENT_ROUTER = "router"
COMPONENT_PLAN = "plan"
COMPONENT_PROFILE = "profile"

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_PAIRED = "prefill-decode"
# serving.mode Colocated: one process per pod doing both phases (`distserve worker colocated`).
ROLE_COLOCATED = "colocated"
ROLE_ROUTER = "router"

HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"


def base(instance: str, component: str) -> dict[str, str]:
    """Labels every child of one DistServeDeployment carries."""
    return {
        APP_NAME: NAME_VALUE,
        APP_INSTANCE: instance,
        APP_COMPONENT: component,
        APP_MANAGED_BY: MANAGER_VALUE,
    }


def owned_selector(instance: str) -> dict[str, str]:
    """Selects every child of one DistServeDeployment (for listing and pruning)."""
    return {APP_INSTANCE: instance, APP_MANAGED_BY: MANAGER_VALUE}
