{{- define "edgefleet.name" -}}edgefleet-operator{{- end -}}
{{- define "edgefleet.labels" -}}
app.kubernetes.io/name: edgefleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "edgefleet.selector" -}}
app.kubernetes.io/name: edgefleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "edgefleet.bootstrapSecret" -}}
{{- if .Values.gateway.bootstrapToken.existingSecret -}}
{{ .Values.gateway.bootstrapToken.existingSecret }}
{{- else -}}
{{ .Release.Name }}-bootstrap-token
{{- end -}}
{{- end -}}
