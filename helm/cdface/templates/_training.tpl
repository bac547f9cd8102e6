{{/* ---------- retraining pods ----------
  One retraining run is `cdface retrain --run-id ID`, split over two Jobs so that GPUs are held
  only while training:
    - the train Job (component "training", GPUs): `--steps train`; it writes the step's completion
      marker /checkpoints/<ID>/steps/train.json on the shared run volume;
    - the pipeline Job (component "pipeline", CPU only): waits for that marker, then
      `--steps eval,export,publish,load,reembed,promote` (see cdface.training.pipelineSteps).
  Every step is idempotent under its run id, so a retried pod resumes instead of starting over. */}}

{{- define "cdface.training.pipelineSteps" -}}
{{- $steps := list "eval" "export" "publish" "load" "reembed" }}
{{- if .Values.training.autoPromote }}{{ $steps = append $steps "promote" }}{{ end }}
{{- join "," $steps }}
{{- end }}

{{/* The completion marker the train step writes and the pipeline Job waits for. */}}
{{- define "cdface.training.trainMarker" -}}/checkpoints/${RUN_ID}/steps/train.json{{- end }}

{{/* How a container learns its run id, as environment (RUN_ID, or JOB_NAME to derive it from).
     A Job takes training.job.runId. A CronJob's Jobs are named <cronjob>-<scheduled time in
     minutes since the epoch> by the CronJob controller, and a Job's pods carry that name in the
     label batch.kubernetes.io/job-name: the run id is its last dash-separated part, the same in
     every retry of the Job and in both CronJobs (same schedule, same time zone). A pod name would
     change with each retry. Call with (dict "runId" STRING-or-""). */}}
{{- define "cdface.training.runIdEnv" -}}
{{- if .runId }}
- name: RUN_ID
  value: {{ .runId | quote }}
{{- else }}
- name: JOB_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['batch.kubernetes.io/job-name']
{{- end }}
{{- end }}

{{/* What a CronJob's containers run first to set RUN_ID: the one run-id expression of both
     CronJobs (nothing for a Job, whose RUN_ID is in the environment). */}}
{{- define "cdface.training.runIdShell" -}}
{{- if not .runId }}RUN_ID="${JOB_NAME##*-}" && {{ end }}
{{- end }}

{{/* `cdface retrain` with the arguments every step shares. */}}
{{- define "cdface.training.retrainArgs" -}}
--run-id "$RUN_ID" --work-dir /checkpoints --model-repository /models --model {{ .Values.model.name | squote }}
{{- end }}

{{/* The GPU container: the train step under torchrun (one process per GPU; under a PyTorchJob the
     operator's PET_* variables give torchrun the node count, rank and rendezvous address). Call
     with (dict "ctx" $ "runId" RUNID "name" CONTAINER-NAME). */}}
{{- define "cdface.training.trainContainer" -}}
{{- $ctx := .ctx }}
{{- $tr := $ctx.Values.training }}
- name: {{ .name | default "train" }}
  image: {{ include "cdface.image" $tr.image | quote }}
  imagePullPolicy: {{ $tr.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - >-
      {{ include "cdface.training.runIdShell" . }}exec torchrun --nproc-per-node "$GPUS" -m cdface.cli retrain
      {{ include "cdface.training.retrainArgs" $ctx }} --steps train
      --preset {{ $tr.preset | squote }}
      --set {{ printf "data.path=/data/%s" $tr.dataset.path | squote }}
      {{- $heldOut := list }}{{ range $tr.dataset.heldOut }}{{ $heldOut = append $heldOut (printf "/data/%s/%s" $tr.dataset.path .) }}{{ end }}
      --set {{ printf "data.val=[%s]" (join "," $heldOut) | squote }}
      {{- range $tr.set }} --set {{ . | squote }}{{ end }}
  env:
    {{- include "cdface.training.runIdEnv" . | nindent 4 }}
    - name: GPUS
      value: {{ $tr.gpus | quote }}
    # Plain ArcFace first (stable difficulty scores), then the joint stage from its checkpoint.
    - name: CDFACE_RETRAIN_TWO_STAGE
      value: {{ $tr.twoStage | quote }}
    - name: HOME
      value: /tmp
  resources:
    {{- $r := deepCopy $tr.resources }}
    {{- $_ := set $r "limits" (merge (dict $ctx.Values.triton.gpuResourceName $tr.gpus) (default (dict) $r.limits)) }}
    {{- toYaml $r | nindent 4 }}
  securityContext:
    {{- toYaml $tr.securityContext | nindent 4 }}
  volumeMounts:
    - {name: checkpoints, mountPath: /checkpoints}
    - {name: data, mountPath: /data, readOnly: true}
    - {name: dshm, mountPath: /dev/shm}
    - {name: tmp, mountPath: /tmp}
{{- end }}

{{/* The pipeline pod's containers: an init container that waits for the train step's marker,
     then the CPU steps. Only these pods get the Triton model-control key and the database. Call
     with (dict "ctx" $ "runId" RUNID). */}}
{{/* The environment of every pod that changes which model is served (the retraining pipeline,
     `cdface model` Jobs): the gallery database, the keys that open retained crops (re-embedding
     reads them), the model repository, every Triton pod, and Triton's model-control key. The
     gateway's settings names (CDFACE_SERVE_*), which `cdface retrain` and `cdface model` fall back
     to. Only these pods get the model-control key. */}}
{{- define "cdface.pipeline.env" -}}
{{- $t := .Values.triton }}
{{ include "cdface.database.env" (dict "ctx" . "urlVar" "CDFACE_SERVE_DATABASE_URL") }}
{{- with (include "cdface.cropKeys.env" .) }}
{{ . }}
{{- end }}
- name: CDFACE_SERVE_MODEL
  value: {{ .Values.model.name | quote }}
- name: CDFACE_SERVE_MODEL_REPOSITORY
  value: /models
# Every Triton pod over gRPC (the headless Service that lists them all, ready or not): in explicit
# model-control mode each pod loads a version only when told.
- name: CDFACE_SERVE_TRITON_URL
  value: {{ printf "dns:///%s-pods.%s.svc.%s:8001" (include "cdface.triton.fullname" .) .Release.Namespace .Values.clusterDomain | quote }}
- name: CDFACE_TRITON_CONTROL_HEADER
  value: {{ $t.modelControl.header | quote }}
- name: CDFACE_TRITON_CONTROL_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cdface.triton.controlSecretName" . }}
      key: model-control-key
- name: HOME
  value: /tmp
{{- end }}

{{- define "cdface.training.pipelineContainers" -}}
{{- $ctx := .ctx }}
{{- $tr := $ctx.Values.training }}
initContainers:
  # Holds no GPU and almost no CPU: the Job's activeDeadlineSeconds bounds the wait.
  - name: wait-for-train
    image: {{ include "cdface.image" $tr.image | quote }}
    imagePullPolicy: {{ $tr.image.pullPolicy }}
    command:
      - /bin/sh
      - -c
      - >-
        {{ include "cdface.training.runIdShell" . }}echo "run $RUN_ID: waiting for {{ include "cdface.training.trainMarker" . }}" &&
        until [ -f "{{ include "cdface.training.trainMarker" . }}" ]; do sleep {{ $tr.waitPollSeconds }}; done
    env:
      {{- include "cdface.training.runIdEnv" . | nindent 6 }}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {cpu: 100m, memory: 64Mi}
    securityContext:
      {{- toYaml $tr.securityContext | nindent 6 }}
    volumeMounts:
      - {name: checkpoints, mountPath: /checkpoints, readOnly: true}
      - {name: tmp, mountPath: /tmp}
containers:
  - name: pipeline
    image: {{ include "cdface.image" $tr.image | quote }}
    imagePullPolicy: {{ $tr.image.pullPolicy }}
    command:
      - /bin/sh
      - -c
      - >-
        {{ include "cdface.training.runIdShell" . }}exec cdface retrain {{ include "cdface.training.retrainArgs" $ctx }}
        --steps {{ include "cdface.training.pipelineSteps" $ctx }}
        --backend {{ $tr.publish.backend }} --max-batch-size {{ $tr.publish.maxBatchSize }}
        {{- if and $ctx.Values.triton.tensorrt.enabled (eq $tr.publish.backend "onnxruntime_onnx") }} --tensorrt-cache /engine-cache{{ end }}
        {{- with $tr.promoteMargin }} --margin {{ . }}{{ end }}
    env:
      {{- include "cdface.training.runIdEnv" . | nindent 6 }}
      {{- include "cdface.pipeline.env" $ctx | nindent 6 }}
      {{- with $ctx.Values.model.gracePeriodSeconds }}
      - name: CDFACE_RETRAIN_GRACE_S
        value: {{ . | quote }}
      {{- end }}
    resources:
      {{- toYaml $tr.pipelineResources | nindent 6 }}
    securityContext:
      {{- toYaml $tr.securityContext | nindent 6 }}
    volumeMounts:
      - {name: checkpoints, mountPath: /checkpoints}
      - {name: models, mountPath: /models}
      - {name: tmp, mountPath: /tmp}
{{- end }}

{{/* The Job spec fields both retraining Jobs share: deadline, retries and what a failure means.
     Exit status 2 is cdface's "refused" (a gate such as export parity or promotion, or bad input):
     retrying cannot change the answer, so the Job fails at once. A pod evicted or preempted
     (DisruptionTarget: a drain, serving preempting training) does not count against backoffLimit.
     Call with (dict "deadline" SECONDS "backoffLimit" N). */}}
{{- define "cdface.training.jobPolicy" -}}
backoffLimit: {{ .backoffLimit }}
activeDeadlineSeconds: {{ .deadline }}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        operator: In
        values: [2]
    - action: Ignore
      onPodConditions:
        - {type: DisruptionTarget, status: "True"}
{{- end }}

{{/* The pod spec of a retraining Job / CronJob. Call with (dict "ctx" $ "runId" RUNID "kind"
     "train"|"pipeline"). podFailurePolicy requires restartPolicy Never. */}}
{{- define "cdface.training.podSpec" -}}
{{- $ctx := .ctx }}
{{- $tr := $ctx.Values.training }}
{{- $steps := ternary (list "train") (list "pipeline") (eq .kind "train") }}
restartPolicy: Never
serviceAccountName: {{ include "cdface.serviceAccountName" $ctx }}
automountServiceAccountToken: false
{{- include "cdface.imagePullSecrets" $ctx }}
securityContext:
  {{- toYaml $tr.podSecurityContext | nindent 2 }}
{{- if eq .kind "train" }}
containers:
  {{- include "cdface.training.trainContainer" (dict "ctx" $ctx "runId" .runId) | nindent 2 }}
{{- else }}
{{ include "cdface.training.pipelineContainers" (dict "ctx" $ctx "runId" .runId) }}
{{- end }}
{{ include "cdface.training.volumes" (dict "ctx" $ctx "steps" $steps) }}
{{- include "cdface.training.scheduling" (dict "ctx" $ctx "steps" $steps) }}
{{- end }}

{{/* The volumes of a pod running STEPS ("train" or "pipeline"): exactly what its containers
     mount, so a pod never waits on a claim it does not use. Call with (dict "ctx" $ "steps" LIST). */}}
{{- define "cdface.training.volumes" -}}
{{- $tr := .ctx.Values.training }}
volumes:
  - name: checkpoints
    persistentVolumeClaim:
      claimName: {{ include "cdface.checkpoints.claimName" .ctx }}
  {{- if has "train" .steps }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ $tr.dataset.existingClaim }}
      readOnly: true
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $tr.shmSize }}
  {{- else }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "cdface.modelRepository.claimName" .ctx }}
  {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 20Gi
{{- end }}

{{/* Where a pod running STEPS ("train", "pipeline", or "model": a `cdface model` pod) may run. The train pod: training's node selection and tolerations
     (GPU nodes). The pipeline pod needs no GPU node: training's nodeSelector and tolerations are
     for GPUs, so it takes training.pipelineNodeSelector instead, and (when the model repository
     attaches to one node only) the node running Triton. When the chart's run volume attaches to
     one node only, both pods share it on Triton's node (the single-node layout). Both take
     training's priority class. Call with (dict "ctx" $ "steps" LIST). */}}
{{- define "cdface.training.scheduling" -}}
{{- $tr := .ctx.Values.training }}
{{- $train := has "train" .steps }}
{{- with (include "cdface.priorityClassName" (dict "ctx" .ctx "name" $tr.priorityClassName "tier" "training")) }}
{{ . }}
{{- end }}
{{- with (ternary $tr.nodeSelector $tr.pipelineNodeSelector $train) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (ternary $tr.tolerations $tr.pipelineTolerations $train) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $ckpt := $tr.checkpoints }}
{{- $ckptSingleNode := and (not $ckpt.existingClaim) (not (has "ReadWriteMany" $ckpt.accessModes)) (not (has "ReadOnlyMany" $ckpt.accessModes)) }}
{{- $usesRunVolume := or $train (has "pipeline" .steps) }}
{{- $pin := or (and (not $train) (include "cdface.modelRepository.singleNode" .ctx)) (and $usesRunVolume $ckptSingleNode) }}
{{- with (include "cdface.affinity" (dict "ctx" .ctx "affinity" $tr.affinity "pin" $pin)) }}
{{ . }}
{{- end }}
{{- end }}
