{{/* Names and labels shared by every template. */}}

{{- define "distserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "distserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "distserve.labels" -}}
{{ include "distserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distserve
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "distserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "distserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces watched, as a list; empty means all namespaces. */}}
{{- define "distserve.watchNamespaces" -}}
{{- if eq .Values.watch.scope "ReleaseNamespace" -}}
{{- list .Release.Namespace | toJson -}}
{{- else if eq .Values.watch.scope "Namespaces" -}}
{{- .Values.watch.namespaces | toJson -}}
{{- else -}}
{{- list | toJson -}}
{{- end -}}
{{- end -}}

{{/*
Least privilege: exactly the calls the operator makes (operator/distserve_operator/kube.py, kopf).
- distservedeployments: kopf lists and watches them and patches its annotations and finalizer;
  the operator reads the live object and patches status.
- children it renders and adopts (GET, list by owner, POST, merge-PATCH, DELETE when pruned): never watched.
- events: core/v1 Events on plan, re-plan and invalid specs.
- gang scheduling only: worker pods (watched through a label selector, patched to join a PodGroup) and PodGroups.
*/}}
{{- define "distserve.rules" -}}
- apiGroups: ["distserve.io"]
  resources: ["distservedeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["distserve.io"]
  resources: ["distservedeployments/status"]
  verbs: ["get", "patch"]
# Children: server-side apply (patch; create when the apply creates), list to prune. No get:
# an apply needs no read first. ConfigMaps also get: a profile a deployment names.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# spec.planner.profiling Auto: the profiling Jobs (their pods report through termination messages,
# read with the pod rule below: the Jobs' pods get no token and no Role).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "create", "delete"]
# Worker pods that wait for GPUs, and the quota and other pods that leave fewer: plans that fit.
- apiGroups: [""]
  resources: ["pods", "resourcequotas"]
  verbs: ["get", "list"]
{{- if .Values.podGroups.enabled }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["list", "create", "patch", "delete"]
{{- end }}
{{- end -}}

{{/* Nodes are cluster-scoped: read-only, for the GPUs they can allocate (capacity.readNodes). */}}
{{- define "distserve.nodeRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list"]
{{- end -}}
