{{/* Names and labels, in the usual Helm shape. */}}

{{- define "asset-forwarder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asset-forwarder.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "asset-forwarder.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asset-forwarder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asset-forwarder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "asset-forwarder.labels" -}}
helm.sh/chart: {{ include "asset-forwarder.chart" . }}
{{ include "asset-forwarder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: forwarder
{{- end -}}

{{- define "asset-forwarder.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "asset-forwarder.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "asset-forwarder.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The HTTP port the forwarder listens on: config.http.port, 8080 by default. */}}
{{- define "asset-forwarder.httpPort" -}}
{{- $http := .Values.config.http | default dict -}}
{{- $http.port | default 8080 | int -}}
{{- end -}}

{{/*
Checks that JSON schema cannot express, as one clear message at install time.
*/}}
{{- define "asset-forwarder.validate" -}}
{{- $shutdown := .Values.config.shutdown_timeout | default 15 | float64 -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $shutdown -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than config.shutdown_timeout (%v): the pod would be killed before it finished its in-flight work" .Values.terminationGracePeriodSeconds $shutdown) -}}
{{- end -}}
{{- if and (or .Values.secrets.env .Values.secrets.items) (not .Values.secrets.existingSecret) -}}
{{- fail "secrets.env and secrets.items name keys of a Secret: set secrets.existingSecret to its name" -}}
{{- end -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- if and (kindIs "invalid" $pdb.maxUnavailable) (kindIs "invalid" $pdb.minAvailable) -}}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable (the budget is always rendered)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}
