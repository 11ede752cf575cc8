{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "axpo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of a component's objects: (list $ "inference") */}}
{{- define "axpo.name" -}}
{{- printf "%s-%s" (include "axpo.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{- define "axpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "axpo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: (list $ "component") */}}
{{- define "axpo.selectorLabels" -}}
app.kubernetes.io/name: axpo
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "axpo.labels" -}}
{{ include "axpo.selectorLabels" . }}
app.kubernetes.io/part-of: axpo
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{/* Images --------------------------------------------------------------------------- */}}

{{/* axpo/<service>:<tag>, under image.registry when set: (list $ "inference" "tag-override") */}}
{{- define "axpo.image" -}}
{{- $root := index . 0 -}}
{{- $tag := $root.Values.image.tag -}}
{{- if and (gt (len .) 2) (index . 2) -}}{{- $tag = index . 2 -}}{{- end -}}
{{- $repo := printf "axpo/%s" (index . 1) -}}
{{- if $root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $root.Values.image.registry) $repo $tag -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Service addresses ---------------------------------------------------------------- */}}

{{/* host:port of a component's ClusterIP Service: (list $ "tools" port) */}}
{{- define "axpo.target" -}}
{{- printf "%s:%v" (include "axpo.name" (list (index . 0) (index . 1))) (index . 2) -}}
{{- end -}}

{{/* The learner's inference targets: every replica by its pod DNS name (JSON). */}}
{{- define "axpo.inferenceTargets" -}}
{{- $name := include "axpo.name" (list . "inference") -}}
{{- $targets := list -}}
{{- range $i := until (int .Values.inference.replicas) -}}
{{- $host := printf "%s-%d.%s-headless.%s.svc.%s:%v" $name $i $name $.Release.Namespace $.Values.clusterDomain $.Values.inference.port -}}
{{- $t := dict "target" $host "deadline_s" 600 -}}
{{- if $.Values.grpcAuth.enabled -}}{{- $_ := set $t "auth_token" "$(GRPC_AUTH_TOKEN)" -}}{{- end -}}
{{- $targets = append $targets $t -}}
{{- end -}}
{{- toJson $targets -}}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------ */}}

{{- define "axpo.redisInternal" -}}
{{- not (or .Values.redis.external.url .Values.redis.external.existingSecret) -}}
{{- end -}}

{{/* One env entry holding the Redis URL: (list $ "AXPO_API_REDIS_URL") */}}
{{- define "axpo.redisUrlEnv" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
{{- if $root.Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.external.existingSecret }}
      key: {{ $root.Values.redis.external.key }}
{{- else if $root.Values.redis.external.url }}
  value: {{ $root.Values.redis.external.url | quote }}
{{- else }}
  value: {{ printf "redis://%s:6379/0" (include "axpo.name" (list $root "redis")) | quote }}
{{- end }}
{{- end -}}

{{/* host:port for KEDA's Redis triggers. */}}
{{- define "axpo.redisAddress" -}}
{{- if .Values.autoscaling.keda.redisAddress -}}
{{- .Values.autoscaling.keda.redisAddress -}}
{{- else if .Values.redis.external.existingSecret -}}
{{- fail "autoscaling.keda.redisAddress: set it (host:port) when redis.external.existingSecret holds the URL" -}}
{{- else if .Values.redis.external.url -}}
{{- (urlParse .Values.redis.external.url).host -}}
{{- else -}}
{{- printf "%s:6379" (include "axpo.name" (list . "redis")) -}}
{{- end -}}
{{- end -}}

{{- define "axpo.redisDatabase" -}}
{{- if and .Values.redis.external.url (not .Values.redis.external.existingSecret) -}}
{{- $db := trimPrefix "/" (urlParse .Values.redis.external.url).path -}}
{{- default "0" $db -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/* Env ---------------------------------------------------------------------------------- */}}

{{/* The gRPC token as GRPC_AUTH_TOKEN (referenced as $(GRPC_AUTH_TOKEN) by later entries). */}}
{{- define "axpo.grpcTokenEnv" -}}
{{- if .Values.grpcAuth.enabled }}
- name: GRPC_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "axpo.name" (list . "grpc-auth")) .Values.grpcAuth.existingSecret }}
      key: {{ .Values.grpcAuth.key }}
{{- end }}
{{- end -}}

{{/* A component's extra env (values: <component>.env), sorted: (dict "env" map) */}}
{{- define "axpo.extraEnv" -}}
{{- range $k, $v := .env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Where writable caches go with a read-only root filesystem. */}}
{{- define "axpo.homeEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
{{- end -}}

{{/* Security ------------------------------------------------------------------------------ */}}

{{- define "axpo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "axpo.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Probes --------------------------------------------------------------------------------- */}}

{{/* Native gRPC health probes (grpc.health.v1, whole server): (dict "port" p "startup" n) */}}
{{- define "axpo.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ .startup | default 30 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* The model ------------------------------------------------------------------------------ */}}

{{/*
An initContainer putting the model into /models/model: (list $ "component" "image" full)
full=false: only the tokenizer, chat template and configs (what a rollout worker reads).
*/}}
{{- define "axpo.modelInit" -}}
{{- $root := index . 0 -}}
{{- $image := index . 2 -}}
{{- $full := index . 3 -}}
- name: model
  image: {{ $image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
{{- if eq $root.Values.model.source "tiny" }}
  # Deterministic: the same seed gives identical files in every pod.
  command:
    - sh
    - -c
    - >-
      test -f /models/model/config.json ||
      axpo model tiny --out /models/model --seed {{ int $root.Values.model.tiny.seed }}
{{- else if eq $root.Values.model.source "hub" }}
  command:
    - python
    - -c
    - |
      import os
      from huggingface_hub import snapshot_download
      patterns = None if os.environ["FULL"] == "true" else ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
      path = snapshot_download(os.environ["MODEL_NAME"], revision=os.environ.get("MODEL_REVISION") or None, local_dir="/models/model", allow_patterns=patterns)
      print("model ready:", path)
{{- else }}
{{- fail (printf "model.source %q: hub or tiny" $root.Values.model.source) }}
{{- end }}
  env:
    - name: MODEL_NAME
      value: {{ $root.Values.model.name | quote }}
    - name: MODEL_REVISION
      value: {{ $root.Values.model.revision | quote }}
    - name: FULL
      value: {{ $full | quote }}
    - name: HF_HOME
      value: /tmp/hf
    {{- include "axpo.homeEnv" $root | nindent 4 }}
{{- if $root.Values.model.hfTokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $root.Values.model.hfTokenSecret.name }}
          key: {{ $root.Values.model.hfTokenSecret.key }}
{{- end }}
  securityContext:
    {{- include "axpo.containerSecurityContext" $root | nindent 4 }}
  resources:
    requests: {cpu: 500m, memory: 2Gi}
    limits: {memory: 8Gi}
  volumeMounts:
    - {name: model, mountPath: /models}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* The model volume as a pod volume (emptyDir), or nothing (a volumeClaimTemplate). */}}
{{- define "axpo.modelVolume" -}}
{{- if ne .Values.model.storage.type "pvc" }}
- name: model
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "axpo.modelClaimTemplate" -}}
{{- if eq .Values.model.storage.type "pvc" }}
- metadata:
    name: model
  spec:
    accessModes: [ReadWriteOnce]
    {{- with .Values.model.storage.storageClassName }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ .Values.model.storage.size }}
{{- end }}
{{- end -}}

{{/* Scheduling: (dict "c" component-values) */}}
{{- define "axpo.scheduling" -}}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "axpo.podCommon" -}}
serviceAccountName: {{ include "axpo.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
