{{- define "lmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmserve.labels" -}}
app.kubernetes.io/name: lmserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lmserve.selector" -}}
app.kubernetes.io/name: lmserve
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lmserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A model's name as a DNS label (Service and Deployment names). Call with (dict "root" $ "model" $m). */}}
{{- define "lmserve.modelSlug" -}}
{{- regexReplaceAll "[^a-z0-9-]" (lower .model.name) "-" | trunc 20 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmserve.modelFullname" -}}
{{- printf "%s-model-%s" (include "lmserve.fullname" .root) (include "lmserve.modelSlug" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmserve.gatewaySecret" -}}
{{- .Values.gateway.existingSecret | default (printf "%s-gateway" (include "lmserve.fullname" .)) -}}
{{- end -}}

{{/* The gateway's database URL: external, in-chart PostgreSQL, else SQLite on the pod's disk (1 replica). */}}
{{- define "lmserve.databaseUrl" -}}
{{- if .Values.gateway.databaseUrl -}}
{{ .Values.gateway.databaseUrl }}
{{- else if .Values.postgresql.enabled -}}
postgresql+psycopg://lmserve:{{ .Values.postgresql.password }}@{{ include "lmserve.fullname" . }}-postgresql:5432/lmserve
{{- else -}}
sqlite:////data/lmserve-gateway.db
{{- end -}}
{{- end -}}

{{- define "lmserve.redisUrl" -}}
{{- if .Values.gateway.redisUrl -}}
{{ .Values.gateway.redisUrl }}
{{- else if .Values.redis.enabled -}}
redis://{{ include "lmserve.fullname" . }}-redis:6379/0
{{- end -}}
{{- end -}}
