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
{{- /* Non-empty when any attestation root is set (the roots ConfigMap is rendered). */ -}}
{{- define "edgefleet.hasRoots" -}}
{{- $a := .Values.attestation -}}
{{- $snp := false -}}
{{- range $_, $pem := $a.snp.roots }}{{ if $pem }}{{ $snp = true }}{{ end }}{{ end -}}
{{- if or $a.tpm.ekCaBundle $a.tpm.ekIntermediates $a.tdx.sgxRootCa $snp -}}true{{- end -}}
{{- end -}}
