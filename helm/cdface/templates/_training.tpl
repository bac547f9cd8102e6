{{/* ---------- retraining pods ----------
  The steps of one retraining run, in order: train -> publish -> reembed. A Job runs all but the
  last as init containers (Kubernetes runs those one after another, each only if the previous one
  succeeded) and the last as its container. */}}

{{- define "cdface.training.steps" -}}
{{- $s := .Values.training.steps }}
{{- $steps := list }}
{{- if $s.train }}{{ $steps = append $steps "train" }}{{ end }}
{{- if $s.publish }}{{ $steps = append $steps "publish" }}{{ end }}
{{- if or $s.publish $s.reembed }}{{ $steps = append $steps "reembed" }}{{ end }}
{{- join "," $steps }}
{{- end }}

{{/* The pod's component label: "reembed" when it runs the gallery step (the NetworkPolicy lets
     such pods reach Triton and the database), else "training". */}}
{{- define "cdface.training.component" -}}
{{- if has "reembed" (splitList "," (include "cdface.training.steps" .)) }}reembed{{ else }}training{{ end }}
{{- end }}

{{/* RUN_ID names the run's directory on the checkpoint volume. A CronJob's runs take their Job's
     name, so each scheduled run has its own. Call with (dict "ctx" $ "runId" STRING-or-"" ). */}}
{{- define "cdface.training.runIdEnv" -}}
- name: RUN_ID
{{- if .runId }}
  value: {{ .runId | quote }}
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['batch.kubernetes.io/job-name']
{{- end }}
{{- end }}

{{/* One step's container. Call with (dict "ctx" $ "step" NAME "runId" RUNID "name" CONTAINER-NAME). */}}
{{- define "cdface.training.container" -}}
{{- $ctx := .ctx }}
{{- $tr := $ctx.Values.training }}
- name: {{ .name | default .step }}
  {{- if eq .step "reembed" }}
  image: {{ include "cdface.image" $ctx.Values.gateway.image | quote }}
  imagePullPolicy: {{ $ctx.Values.gateway.image.pullPolicy }}
  command: ["python", "/scripts/reembed.py"]
  env:
    {{- include "cdface.gateway.env" $ctx | nindent 4 }}
    - name: TRITON_PODS
      value: {{ include "cdface.triton.fullname" $ctx }}-pods
    - name: CONTROL_MODE
      value: {{ $ctx.Values.triton.modelControlMode | quote }}
    - name: REEMBED
      value: {{ ternary "1" "0" (and $tr.steps.reembed (ne $ctx.Values.database.mode "sqlite")) | quote }}
    - name: HOME
      value: /tmp
  resources:
    {{- toYaml $tr.reembedResources | nindent 4 }}
  securityContext:
    {{- toYaml $ctx.Values.gateway.securityContext | nindent 4 }}
  volumeMounts:
    - {name: scripts, mountPath: /scripts, readOnly: true}
    - {name: models, mountPath: /models, readOnly: true}
    - {name: tmp, mountPath: /tmp}
  {{- else }}
  image: {{ include "cdface.image" $tr.image | quote }}
  imagePullPolicy: {{ $tr.image.pullPolicy }}
  command: ["/bin/sh", "/scripts/{{ .step }}.sh"]
  env:
    {{- include "cdface.training.runIdEnv" . | nindent 4 }}
    - name: MODEL
      value: {{ $ctx.Values.model.name | quote }}
    - name: GPUS
      value: {{ $tr.gpus | quote }}
    - name: HOME
      value: /tmp
  resources:
    {{- if eq .step "train" }}
    {{- $r := deepCopy $tr.resources }}
    {{- $_ := set $r "limits" (merge (dict $ctx.Values.triton.gpuResourceName $tr.gpus) (default (dict) $r.limits)) }}
    {{- toYaml $r | nindent 4 }}
    {{- else }}
    {{- toYaml $tr.exportResources | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $tr.securityContext | nindent 4 }}
  volumeMounts:
    - {name: scripts, mountPath: /scripts, readOnly: true}
    - {name: checkpoints, mountPath: /checkpoints}
    - {name: tmp, mountPath: /tmp}
    {{- if eq .step "train" }}
    - {name: data, mountPath: /data, readOnly: true}
    - {name: dshm, mountPath: /dev/shm}
    {{- else }}
    - {name: models, mountPath: /models}
    {{- end }}
  {{- end }}
{{- end }}

{{/* The pod spec of a retraining Job / CronJob. Call with (dict "ctx" $ctx "runId" RUNID). */}}
{{- define "cdface.training.podSpec" -}}
{{- $ctx := .ctx }}
{{- $tr := $ctx.Values.training }}
{{- $steps := splitList "," (include "cdface.training.steps" $ctx) }}
{{- $runId := .runId }}
restartPolicy: Never
serviceAccountName: {{ include "cdface.serviceAccountName" $ctx }}
automountServiceAccountToken: false
{{- include "cdface.imagePullSecrets" $ctx }}
securityContext:
  {{- toYaml $tr.podSecurityContext | nindent 2 }}
{{- if gt (len $steps) 1 }}
initContainers:
  {{- range initial $steps }}
  {{- include "cdface.training.container" (dict "ctx" $ctx "step" . "runId" $runId) | nindent 2 }}
  {{- end }}
{{- end }}
containers:
  {{- include "cdface.training.container" (dict "ctx" $ctx "step" (last $steps) "runId" $runId) | nindent 2 }}
{{ include "cdface.training.volumes" (dict "ctx" $ctx "steps" $steps) }}
{{- include "cdface.training.scheduling" (dict "ctx" $ctx "steps" $steps) }}
{{- end }}

{{/* The volumes of a pod running STEPS (a list): exactly what its containers mount, so a pod never
     waits on a claim it does not use (a training-only PyTorchJob pod needs the data, not the model
     repository). Call with (dict "ctx" $ "steps" LIST). */}}
{{- define "cdface.training.volumes" -}}
{{- $tr := .ctx.Values.training }}
volumes:
  - name: scripts
    configMap:
      name: {{ include "cdface.fullname" .ctx }}-training-scripts
  {{- if has "train" .steps }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ $tr.dataset.existingClaim }}
      readOnly: true
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $tr.shmSize }}
  {{- end }}
  {{- if or (has "train" .steps) (has "publish" .steps) }}
  - name: checkpoints
    persistentVolumeClaim:
      claimName: {{ include "cdface.checkpoints.claimName" .ctx }}
  {{- end }}
  {{- if or (has "publish" .steps) (has "reembed" .steps) }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "cdface.modelRepository.claimName" .ctx }}
  {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 20Gi
{{- end }}

{{/* Where a pod running STEPS may run: training's node selection, its priority class, and (when the
     model repository attaches to one node only) the node running Triton for pods that mount it.
     Call with (dict "ctx" $ "steps" LIST). */}}
{{- define "cdface.training.scheduling" -}}
{{- $tr := .ctx.Values.training }}
{{- with (include "cdface.priorityClassName" (dict "ctx" .ctx "name" $tr.priorityClassName "tier" "training")) }}
{{ . }}
{{- end }}
{{- with $tr.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tr.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "cdface.affinity" (dict "ctx" .ctx "affinity" $tr.affinity "pin" (and (or (has "publish" .steps) (has "reembed" .steps)) (include "cdface.modelRepository.singleNode" .ctx)))) }}
{{ . }}
{{- end }}
{{- end }}
