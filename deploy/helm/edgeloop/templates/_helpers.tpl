{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "edgeloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name used for every object. */}}
{{- define "edgeloop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-cloud" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "edgeloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgeloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgeloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cloud
{{- end -}}

{{- define "edgeloop.labels" -}}
helm.sh/chart: {{ include "edgeloop.chart" . }}
{{ include "edgeloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgeloop
{{- end -}}

{{- define "edgeloop.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Name of the Secret holding the API token: the user's, or the chart's own for trials. */}}
{{- define "edgeloop.tokenSecret" -}}
{{- if .Values.api.token.existingSecret -}}
{{- .Values.api.token.existingSecret -}}
{{- else if .Values.secrets.create -}}
{{- include "edgeloop.fullname" . -}}
{{- else if ne .Values.environment "development" -}}
{{- fail "api.token.existingSecret is required outside development (or secrets.create=true with secrets.apiToken)" -}}
{{- end -}}
{{- end -}}

{{- define "edgeloop.databaseSecret" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if .Values.secrets.create -}}
{{- include "edgeloop.fullname" . -}}
{{- else -}}
{{- fail "database.existingSecret is required: a Secret with the PostgreSQL URL (postgresql+psycopg://...)" -}}
{{- end -}}
{{- end -}}
