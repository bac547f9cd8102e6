{{/* ---------- names and labels ---------- */}}

{{- define "cdface.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component objects append "-gateway", "-triton", ... (kept under 63). */}}
{{- define "cdface.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cdface.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "gateway"). Never change
     these on upgrade: Deployment selectors are immutable. */}}
{{- define "cdface.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cdface.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cdface.labels" -}}
helm.sh/chart: {{ include "cdface.chart" .ctx }}
{{ include "cdface.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: cdface
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cdface.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cdface.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository@digest" when a digest is pinned, else "repository:tag". */}}
{{- define "cdface.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
{{- end }}

{{- define "cdface.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------- addresses and claims ---------- */}}

{{- define "cdface.triton.fullname" -}}{{ include "cdface.fullname" . }}-triton{{- end }}
{{- define "cdface.gateway.fullname" -}}{{ include "cdface.fullname" . }}-gateway{{- end }}
{{- define "cdface.postgresql.fullname" -}}{{ include "cdface.fullname" . }}-postgresql{{- end }}

{{/* The gRPC target the gateway and the re-embedding job dial: the headless Service, through
     gRPC's DNS resolver, so the client sees every ready Triton pod and balances round-robin over
     them (a channel to the ClusterIP is a single connection, pinned by kube-proxy to one pod). */}}
{{- define "cdface.triton.grpcService" -}}{{ include "cdface.triton.fullname" . }}-grpc{{- end }}

{{- define "cdface.triton.grpcAddress" -}}
{{- printf "dns:///%s.%s.svc.%s:8001" (include "cdface.triton.grpcService" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "cdface.modelRepository.claimName" -}}
{{- default (printf "%s-models" (include "cdface.fullname" .)) .Values.triton.modelRepository.pvc.existingClaim }}
{{- end }}

{{/* The Secret holding Triton's model-control key (key model-control-key): mounted by Triton and
     the retraining pipeline pods only, never by the gateway. */}}
{{- define "cdface.triton.controlSecretName" -}}
{{- default (printf "%s-model-control" (include "cdface.triton.fullname" .)) .Values.triton.modelControl.existingSecret }}
{{- end }}

{{- define "cdface.engineCache.claimName" -}}
{{- default (printf "%s-engine-cache" (include "cdface.fullname" .)) .Values.triton.tensorrt.engineCache.pvc.existingClaim }}
{{- end }}

{{- define "cdface.checkpoints.claimName" -}}
{{- default (printf "%s-checkpoints" (include "cdface.fullname" .)) .Values.training.checkpoints.existingClaim }}
{{- end }}

{{/* True (non-empty) when the model repository is a volume that attaches to one node only
     (neither ReadWriteMany nor ReadOnlyMany): every other pod that mounts it must then run on
     the node running Triton. */}}
{{- define "cdface.modelRepository.singleNode" -}}
{{- $m := .Values.triton.modelRepository }}
{{- if and (eq $m.source "pvc") (not (has "ReadWriteMany" $m.pvc.accessModes)) (not (has "ReadOnlyMany" $m.pvc.accessModes)) }}true{{- end }}
{{- end }}

{{/* A pod's affinity: the user's, plus (with "pin") a required pod affinity to a Triton pod on the
     same node. Call with (dict "ctx" $ "affinity" AFFINITY "pin" BOOL); renders "affinity: ..."
     or nothing. */}}
{{- define "cdface.affinity" -}}
{{- $aff := deepCopy (default (dict) .affinity) }}
{{- if .pin }}
{{- $pa := deepCopy (default (dict) (index $aff "podAffinity")) }}
{{- $req := default (list) (index $pa "requiredDuringSchedulingIgnoredDuringExecution") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "cdface.selectorLabels" (dict "ctx" .ctx "component" "triton") | fromYaml)) }}
{{- $_ := set $pa "requiredDuringSchedulingIgnoredDuringExecution" (append $req $term) }}
{{- $_ := set $aff "podAffinity" $pa }}
{{- end }}
{{- with $aff -}}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* "priorityClassName: NAME" or nothing. Call with (dict "ctx" $ "name" VALUE "tier" "serving"|"training"). */}}
{{- define "cdface.priorityClassName" -}}
{{- if .name -}}
priorityClassName: {{ .name }}
{{- else if .ctx.Values.priorityClasses.create -}}
priorityClassName: {{ include "cdface.priorityClass.fullname" (dict "ctx" .ctx "tier" .tier) }}
{{- end }}
{{- end }}

{{/* PriorityClasses are cluster-scoped: the namespace keeps two releases' names apart. */}}
{{- define "cdface.priorityClass.fullname" -}}
{{- printf "%s-%s-%s" .ctx.Release.Namespace (include "cdface.fullname" .ctx) .tier }}
{{- end }}

{{/* The gateway's request body limit in bytes (gateway.settings.max_request_bytes). */}}
{{- define "cdface.gateway.maxRequestBytes" -}}
{{- $v := index .Values.gateway.settings "max_request_bytes" }}
{{- if kindIs "invalid" $v }}20971520{{ else }}{{ int64 $v }}{{ end }}
{{- end }}

{{/* uvicorn's graceful shutdown: what is left of the grace period after the preStop sleep. */}}
{{- define "cdface.gateway.gracefulTimeout" -}}
{{- $g := .Values.gateway }}
{{- sub (sub (int $g.terminationGracePeriodSeconds) (int $g.preStopSleepSeconds)) (int $g.shutdownMarginSeconds) }}
{{- end }}

{{- define "cdface.triton.exitTimeout" -}}
{{- $t := .Values.triton }}
{{- sub (sub (int $t.terminationGracePeriodSeconds) (int $t.preStopSleepSeconds)) 5 }}
{{- end }}

{{/* True (non-empty) when any retraining object renders. */}}
{{- define "cdface.training.enabled" -}}
{{- if or .Values.training.job.enabled .Values.training.cronJob.enabled .Values.training.multiNode.enabled }}true{{- end }}
{{- end }}

{{/* ---------- secrets ---------- */}}

{{- define "cdface.gateway.secretName" -}}
{{- default (printf "%s-gateway" (include "cdface.fullname" .)) .Values.gateway.secrets.existingSecret }}
{{- end }}

{{/* Where an external database's URL comes from: (name, key) of a Secret. */}}
{{- define "cdface.database.secretName" -}}
{{- default (printf "%s-database" (include "cdface.fullname" .)) .Values.database.external.existingSecret }}
{{- end }}

{{- define "cdface.database.secretKey" -}}
{{- if .Values.database.external.existingSecret }}
{{- .Values.database.external.existingSecretKey }}
{{- else }}database-url{{- end }}
{{- end }}

{{- define "cdface.postgresql.secretName" -}}
{{- default (include "cdface.postgresql.fullname" .) .Values.database.postgresql.existingSecret }}
{{- end }}

{{/* A generated secret value that survives upgrades: the value already in the cluster when there is
     one (lookup), else a fresh random one. Under `helm template` / --dry-run lookup sees no cluster,
     so every render there generates new values: never apply `helm template` output over a running
     release's Secrets. Call with (dict "ctx" $ "name" SECRET "key" KEY "length" N). */}}
{{- define "cdface.stableRandom" -}}
{{- $existing := include "cdface.existingSecretValue" . }}
{{- if $existing }}
{{- $existing }}
{{- else }}
{{- randAlphaNum (int .length) }}
{{- end }}
{{- end }}

{{/* The decoded value of KEY in the cluster's Secret NAME, or "" (none, or no cluster to ask). */}}
{{- define "cdface.existingSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- end }}
{{- end }}

{{/* ---------- gateway environment ---------- */}}

{{- define "cdface.gateway.env" -}}
- name: CDFACE_SERVE_TRITON_URL
  value: {{ include "cdface.triton.grpcAddress" . | quote }}
- name: CDFACE_SERVE_MODEL
  value: {{ .Values.model.name | quote }}
{{- if .Values.model.version }}
- name: CDFACE_SERVE_MODEL_VERSION
  value: {{ .Values.model.version | quote }}
{{- end }}
{{- if eq .Values.triton.modelRepository.source "pvc" }}
- name: CDFACE_SERVE_MODEL_REPOSITORY
  value: /models
{{- else }}
- name: CDFACE_SERVE_MANIFEST
  value: /etc/cdface/manifest/manifest.json
{{- end }}
{{- if eq .Values.database.mode "sqlite" }}
- name: CDFACE_SERVE_DB_PATH
  value: {{ .Values.database.sqlite.path | quote }}
# The volume starts empty: the first gateway creates the gallery file (elsewhere a missing file is refused).
- name: CDFACE_SERVE_CREATE_DB
  value: "true"
{{- else }}
{{ include "cdface.database.env" (dict "ctx" . "urlVar" "CDFACE_SERVE_DATABASE_URL") }}
{{- end }}
- name: CDFACE_SERVE_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ include "cdface.gateway.secretName" . }}
      key: key-pepper
{{- with (include "cdface.cropKeys.env" .) }}
{{ . }}
{{- end }}
{{- end }}

{{/* A PostgreSQL gallery's URL as the environment variable urlVar, plus PGPASSWORD for the in-chart
     database. Call with (dict "ctx" $ "urlVar" NAME); database.mode postgresql or external. */}}
{{- define "cdface.database.env" -}}
{{- $ctx := .ctx }}
{{- if eq $ctx.Values.database.mode "postgresql" }}
{{- $pg := $ctx.Values.database.postgresql }}
# libpq (and psycopg over it) reads the password from PGPASSWORD: the URL carries none, so no
# character of the password (@ / % :) can break it, and it never sits in a literal.
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cdface.postgresql.secretName" $ctx }}
      key: password
- name: {{ .urlVar }}
  value: {{ printf "postgresql://%s@%s:5432/%s" $pg.username (include "cdface.postgresql.fullname" $ctx) $pg.database | quote }}
{{- else }}
- name: {{ .urlVar }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cdface.database.secretName" $ctx }}
      key: {{ include "cdface.database.secretKey" $ctx }}
{{- end }}
{{- end }}

{{/* The keys that seal retained crops (docs/data-protection.md); nothing when none are configured
     (then no crop is retained). */}}
{{- define "cdface.cropKeys.env" -}}
{{- with .Values.gateway.cropKeys.existingSecret }}
- name: CDFACE_SERVE_CROP_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: crop-keys
{{- end }}
{{- end }}

{{/* The gateway's own environment: the shared settings plus HTTP and the bootstrap admin key. */}}
{{- define "cdface.gateway.serveEnv" -}}
{{ include "cdface.gateway.env" . }}
- name: CDFACE_SERVE_HOST
  value: "0.0.0.0"
- name: CDFACE_SERVE_PORT
  value: {{ .Values.gateway.port | quote }}
- name: CDFACE_SERVE_LOG_LEVEL
  value: {{ .Values.gateway.logLevel | quote }}
# uvicorn's timeout_graceful_shutdown: the grace period less the preStop sleep and a margin.
- name: CDFACE_SERVE_GRACEFUL_TIMEOUT_S
  value: {{ include "cdface.gateway.gracefulTimeout" . | quote }}
# Shadow mode: the share of identify requests also scored with the candidate model, if any.
- name: CDFACE_SERVE_SHADOW_SHARE
  value: {{ include "cdface.envValue" .Values.gateway.shadowShare | quote }}
# An admin key the gateway registers (hashed) at start, so there is a way in on a fresh database.
- name: CDFACE_SERVE_BOOTSTRAP_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cdface.gateway.secretName" . }}
      key: admin-api-key
      optional: true
{{- with .Values.gateway.rateLimitStorage.existingSecret }}
# Shared rate-limit counters (see values.yaml): a URL that may hold a password, hence a Secret.
- name: CDFACE_SERVE_RATE_LIMIT_STORAGE
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: rate-limit-storage
{{- end }}
{{- range $k, $v := .Values.gateway.settings }}
- name: {{ printf "CDFACE_SERVE_%s" ($k | upper) }}
  {{- /* YAML numbers arrive as floats: write whole ones as integers (20971520, not 2.097152e+07). */}}
  value: {{ include "cdface.envValue" $v | quote }}
{{- end }}
{{- with .Values.gateway.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A setting's value as an environment string: whole numbers without an exponent. */}}
{{- define "cdface.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/* Volumes the gateway code needs wherever it runs: the model repository (read-only, for the
     manifests), the SQLite volume, a writable /tmp under a read-only root. */}}
{{- define "cdface.gateway.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if eq .Values.triton.modelRepository.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "cdface.modelRepository.claimName" . }}
    readOnly: true
{{- else }}
- name: manifest
  configMap:
    name: {{ .Values.gateway.manifestConfigMap }}
{{- end }}
{{- if eq .Values.database.mode "sqlite" }}
- name: gallery
  persistentVolumeClaim:
    claimName: {{ include "cdface.gateway.fullname" . }}-gallery
{{- end }}
{{- end }}

{{- define "cdface.gateway.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if eq .Values.triton.modelRepository.source "pvc" }}
- name: models
  mountPath: /models
  readOnly: true
{{- else }}
- name: manifest
  mountPath: /etc/cdface/manifest
  readOnly: true
{{- end }}
{{- if eq .Values.database.mode "sqlite" }}
- name: gallery
  mountPath: {{ dir .Values.database.sqlite.path }}
{{- end }}
{{- end }}

{{/* ---------- values that a schema cannot check on its own ---------- */}}

{{- define "cdface.validate" -}}
{{- $g := .Values.gateway }}
{{- if and (eq .Values.database.mode "sqlite") (or (gt (int $g.replicaCount) 1) $g.autoscaling.enabled) }}
{{- fail "database.mode=sqlite keeps the gallery in one pod's file: use one gateway replica without autoscaling, or database.mode=postgresql/external" }}
{{- end }}
{{- if and (eq .Values.database.mode "external") (not .Values.database.external.url) (not .Values.database.external.existingSecret) }}
{{- fail "database.mode=external needs database.external.existingSecret (preferred) or database.external.url" }}
{{- end }}
{{- if and (eq .Values.triton.modelRepository.source "url") (not .Values.triton.modelRepository.url) }}
{{- fail "triton.modelRepository.source=url needs triton.modelRepository.url" }}
{{- end }}
{{- if and (eq .Values.triton.modelRepository.source "url") (not $g.manifestConfigMap) }}
{{- fail "with an object-store model repository the gateway reads the model manifest from gateway.manifestConfigMap (a ConfigMap with key manifest.json)" }}
{{- end }}
{{- if and .Values.triton.tensorrt.enabled (ne .Values.triton.modelRepository.source "pvc") }}
{{- fail "triton.tensorrt.enabled builds engines from the ONNX files on the model repository volume: it needs triton.modelRepository.source=pvc" }}
{{- end }}
{{- if and .Values.triton.tensorrt.enabled (lt (int .Values.triton.gpus) 1) }}
{{- fail "triton.tensorrt.enabled needs a GPU: set triton.gpus >= 1" }}
{{- end }}
{{- if and (include "cdface.training.enabled" .) (ne .Values.triton.modelRepository.source "pvc") }}
{{- fail "retraining publishes into the model repository volume: it needs triton.modelRepository.source=pvc" }}
{{- end }}
{{- if and (or .Values.training.job.enabled .Values.training.cronJob.enabled) (eq .Values.database.mode "sqlite") }}
{{- fail "retraining re-embeds the gallery and moves the model pointer in the gallery database, which with database.mode=sqlite only the gateway pod can open: use database.mode=postgresql or external" }}
{{- end }}
{{- if and (or .Values.model.command.enabled .Values.model.syncTriton.enabled) (eq .Values.database.mode "sqlite") }}
{{- fail "model.command and model.syncTriton run `cdface model` in a pod of their own, which cannot open the gateway pod's SQLite file: use database.mode=postgresql or external, or run `cdface model` inside the gateway pod" }}
{{- end }}
{{- if and (or .Values.model.command.enabled .Values.model.syncTriton.enabled) (ne .Values.triton.modelRepository.source "pvc") }}
{{- fail "model.command and model.syncTriton write the model's version policy into the model repository volume: they need triton.modelRepository.source=pvc" }}
{{- end }}
{{- $dl := .Values.training.activeDeadlineSeconds }}
{{- if and (or .Values.training.job.enabled .Values.training.cronJob.enabled) .Values.training.steps.train (le (int $dl.pipeline) (int $dl.train)) }}
{{- fail "training.activeDeadlineSeconds.pipeline must exceed .train: the pipeline Job starts with the train Job and waits for it" }}
{{- end }}
{{- if and (include "cdface.training.enabled" .) .Values.training.steps.train (not .Values.training.dataset.existingClaim) }}
{{- fail "training needs training.dataset.existingClaim (the volume holding the training data)" }}
{{- end }}
{{- if and .Values.gateway.pdb.enabled (not (or (kindIs "invalid" $g.pdb.minAvailable) (kindIs "invalid" $g.pdb.maxUnavailable))) }}
{{- fail "gateway.pdb: set minAvailable or maxUnavailable, not both" }}
{{- end }}
{{- $pgPdb := .Values.database.postgresql.pdb }}
{{- if and $pgPdb.enabled (not (or (kindIs "invalid" $pgPdb.minAvailable) (kindIs "invalid" $pgPdb.maxUnavailable))) }}
{{- fail "database.postgresql.pdb: set minAvailable or maxUnavailable, not both" }}
{{- end }}
{{- /* API keys off is a decision, never a slip: schema and template both refuse it without gateway.insecure. */}}
{{- $noAuth := false }}
{{- if hasKey $g.settings "auth" }}
{{- if has (lower (toString (index $g.settings "auth"))) (list "false" "0" "off" "f" "n" "no") }}{{ $noAuth = true }}{{ end }}
{{- end }}
{{- range $g.extraEnv }}
{{- if and (eq .name "CDFACE_SERVE_AUTH") (has (lower (toString (default "true" .value))) (list "false" "0" "off" "f" "n" "no")) }}{{ $noAuth = true }}{{ end }}
{{- end }}
{{- if and $noAuth (not $g.insecure) }}
{{- fail "gateway.settings.auth=false turns API keys off (anyone who reaches the gateway may enrol, delete and identify): set gateway.insecure=true to mean it" }}
{{- end }}
{{- if lt (int (include "cdface.gateway.gracefulTimeout" .)) 1 }}
{{- fail "gateway.terminationGracePeriodSeconds must exceed preStopSleepSeconds + shutdownMarginSeconds (the rest is uvicorn's graceful shutdown)" }}
{{- end }}
{{- if lt (int (include "cdface.triton.exitTimeout" .)) 1 }}
{{- fail "triton.terminationGracePeriodSeconds must exceed preStopSleepSeconds + 5 (the rest is Triton's --exit-timeout-secs)" }}
{{- end }}
{{- if and $g.autoscaling.enabled (gt (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling: minReplicas exceeds maxReplicas" }}
{{- end }}
{{- $ta := .Values.triton.autoscaling }}
{{- if and $ta.enabled (gt (int $ta.minReplicas) (int $ta.maxReplicas)) }}
{{- fail "triton.autoscaling: minReplicas exceeds maxReplicas" }}
{{- end }}
{{- if and $ta.enabled (eq $ta.provider "keda") (not $ta.keda.serverAddress) }}
{{- fail "triton.autoscaling.provider=keda needs triton.autoscaling.keda.serverAddress (the Prometheus that scrapes Triton)" }}
{{- end }}
{{- $cache := .Values.triton.tensorrt.engineCache }}
{{- if and .Values.triton.tensorrt.enabled (eq $cache.type "hostPath") (not $cache.hostPath) }}
{{- fail "triton.tensorrt.engineCache.type=hostPath needs triton.tensorrt.engineCache.hostPath" }}
{{- end }}
{{- if and .Values.training.multiNode.enabled (not .Values.training.dataset.existingClaim) }}
{{- fail "training.multiNode trains: it needs training.dataset.existingClaim (the volume holding the training data)" }}
{{- end }}
{{- if and .Values.priorityClasses.create (le (int .Values.priorityClasses.servingValue) (int .Values.priorityClasses.trainingValue)) }}
{{- fail "priorityClasses: servingValue must exceed trainingValue (serving outranks retraining)" }}
{{- end }}
{{- if and .Values.database.postgresql.backup.enabled (ne .Values.database.mode "postgresql") }}
{{- fail "database.postgresql.backup dumps the in-chart PostgreSQL: it needs database.mode=postgresql (back an external database up where it runs)" }}
{{- end }}
{{- end }}
