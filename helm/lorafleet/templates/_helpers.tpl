{{/* Names and labels */}}
{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.fullname" -}}
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

{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "api") */}}
{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" .ctx }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- end -}}

{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- include "lorafleet.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "lorafleet.vllmImage" -}}
{{- printf "%s:%s" .Values.serving.vllm.image.repository (default .Chart.AppVersion .Values.serving.vllm.image.tag) -}}
{{- end -}}

{{/* Pod-level pieces every role shares; pass (dict "ctx" $ "role" .Values.api) */}}
{{- define "lorafleet.podCommon" -}}
serviceAccountName: {{ include "lorafleet.serviceAccountName" .ctx }}
automountServiceAccountToken: false
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container env: the ConfigMap and the Secret, then the role's own; pass (dict "ctx" $ "role" .Values.api) */}}
{{- define "lorafleet.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "lorafleet.fullname" .ctx }}
  - secretRef:
      name: {{ include "lorafleet.secretName" .ctx }}
{{- end -}}

{{- define "lorafleet.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOME
  value: /tmp
{{- end -}}

{{- define "lorafleet.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 5
  failureThreshold: 120
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: {{ .probes.readinessPath | default "/readyz" }}
    port: http
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}

{{- define "lorafleet.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/lorafleet
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: {{ if .Values.models.existingClaim }}true{{ else }}false{{ end }}
{{- end -}}

{{- define "lorafleet.volumes" -}}
- name: tmp
  emptyDir: {}
- name: data
  emptyDir: {}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
- name: models
{{- if .Values.models.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* GPU limits merged into a role's resources; pass (dict "resources" .resources "gpu" .gpu "force" bool) */}}
{{- define "lorafleet.resources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- if or .force .gpu.enabled -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits .gpu.resourceName (.gpu.count | int) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The Secret's keys; only those with a value, so an unset one keeps the setting's default */}}
{{- define "lorafleet.secretData" -}}
{{- with .Values.database.url }}
LORAFLEET_DATABASE_URL: {{ . | quote }}
{{- end }}
{{- with .Values.redis.url }}
LORAFLEET_REDIS_URL: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.s3.accessKey }}
LORAFLEET_S3_ACCESS_KEY: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.s3.secretKey }}
LORAFLEET_S3_SECRET_KEY: {{ . | quote }}
{{- end }}
{{- end -}}
