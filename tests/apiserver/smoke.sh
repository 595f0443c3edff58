#!/usr/bin/env bash
# Smoke test for the standalone test API server: builds it (cached), starts etcd +
# edgefleet-test-apiserver on free loopback ports with fresh PKI, and exercises CRDs
# (CEL validation, status subresource, server-side apply), authn, and the
# coordination.k8s.io Lease / events.k8s.io Event shim CRDs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBECTL="${KUBECTL:-kubectl}"

log() { echo "[smoke] $*" >&2; }
fail() { echo "[smoke] FAIL: $*" >&2; exit 1; }

out="$("$HERE/build.sh")"
APISERVER="$(sed -n 's/^apiserver=//p' <<<"$out")"
ETCD="$(sed -n 's/^etcd=//p' <<<"$out")"
[[ -x "$APISERVER" && -x "$ETCD" ]] || fail "build.sh did not produce binaries"

T="$(mktemp -d -t edgefleet-smoke.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if ((rc != 0)); then
    log "exit $rc; last log lines:"
    tail -n 30 "$T/apiserver.log" >&2 2>/dev/null || true
    tail -n 10 "$T/etcd.log" >&2 2>/dev/null || true
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ETCD_PORT=$(free_port); PEER_PORT=$(free_port); API_PORT=$(free_port)

# ------------------------------------------------------------------ PKI
log "generating PKI in $T/pki"
mkdir -p "$T/pki"; cd "$T/pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout ca.key -out ca.crt -subj "/CN=edgefleet-test-ca" 2>/dev/null
cat > server.ext <<X
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
X
cat > client.ext <<X
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
X
for n in server client; do
  subj="/CN=localhost"; [[ $n == client ]] && subj="/O=system:masters/CN=edgefleet-test-admin"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj "$subj" 2>/dev/null
  openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile $n.ext -out $n.crt 2>/dev/null
done
openssl x509 -in client.crt -noout -text | grep -q 'Version: 3' || fail "client cert is not X.509 v3"
cd - >/dev/null

# ------------------------------------------------------------------ etcd
log "starting etcd ($("$ETCD" --version | head -n1)) on 127.0.0.1:$ETCD_PORT"
"$ETCD" --name smoke --data-dir "$T/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "smoke=http://127.0.0.1:$PEER_PORT" \
  --unsafe-no-fsync --log-level warn >"$T/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$ETCD_PORT/health" >/dev/null || fail "etcd not healthy"

# ------------------------------------------------------------------ apiserver
log "starting apiserver on https://127.0.0.1:$API_PORT"
start=$(date +%s.%N)
"$APISERVER" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --secure-port "$API_PORT" \
  --tls-cert-file "$T/pki/server.crt" --tls-private-key-file "$T/pki/server.key" \
  --client-ca-file "$T/pki/ca.crt" >"$T/apiserver.log" 2>&1 &
PIDS+=($!)
CURL=(curl -fsS --cacert "$T/pki/ca.crt" --cert "$T/pki/client.crt" --key "$T/pki/client.key")
for _ in $(seq 300); do
  [[ "$("${CURL[@]}" "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null)" == ok ]] && break
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "apiserver exited"
  sleep 0.1
done
[[ "$("${CURL[@]}" "https://127.0.0.1:$API_PORT/readyz")" == ok ]] || fail "apiserver not ready"
log "ready after $(python3 -c "print(round($(date +%s.%N)-$start,2))") s"

export KUBECONFIG="$T/kubeconfig"
"$KUBECTL" config set-cluster smoke --server "https://127.0.0.1:$API_PORT" --certificate-authority "$T/pki/ca.crt" --embed-certs >/dev/null
"$KUBECTL" config set-credentials admin --client-certificate "$T/pki/client.crt" --client-key "$T/pki/client.key" --embed-certs >/dev/null
"$KUBECTL" config set-context smoke --cluster smoke --user admin --namespace default >/dev/null
"$KUBECTL" config use-context smoke >/dev/null

"$KUBECTL" version -o yaml | grep -E 'gitVersion' >&2
"${CURL[@]}" "https://127.0.0.1:$API_PORT/api" >/dev/null || fail "/api not served"

# ------------------------------------------------------------------ CRD with CEL + status
log "creating CRD widgets.smoke.edgefleet.io"
"$KUBECTL" apply --server-side -f - <<'Y'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.edgefleet.io
spec:
  group: smoke.edgefleet.io
  scope: Namespaced
  names: {kind: Widget, listKind: WidgetList, plural: widgets, singular: widget}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Replicas, type: integer, jsonPath: .spec.replicas}
        - {name: Max, type: integer, jsonPath: .spec.maxReplicas}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              description: Desired widget state.
              required: [replicas, maxReplicas]
              properties:
                replicas: {type: integer, minimum: 0}
                maxReplicas: {type: integer, default: 3}
              x-kubernetes-validations:
                - rule: self.replicas <= self.maxReplicas
                  message: replicas must not exceed maxReplicas
            status:
              type: object
              properties:
                ready: {type: boolean}
Y
"$KUBECTL" wait --for condition=Established --timeout=30s crd/widgets.smoke.edgefleet.io >&2

"$KUBECTL" apply --server-side -f - <<'Y'
apiVersion: smoke.edgefleet.io/v1alpha1
kind: Widget
metadata: {name: good}
spec: {replicas: 2, maxReplicas: 3}
Y
"$KUBECTL" get widgets -o wide
"$KUBECTL" explain widget.spec >/dev/null || fail "kubectl explain failed"

log "invalid object must be rejected by the CEL rule"
if err=$("$KUBECTL" apply --server-side -f - 2>&1 <<'Y'
apiVersion: smoke.edgefleet.io/v1alpha1
kind: Widget
metadata: {name: bad}
spec: {replicas: 5, maxReplicas: 3}
Y
); then fail "invalid object was accepted"; fi
grep -q 'replicas must not exceed maxReplicas' <<<"$err" || fail "unexpected error: $err"
echo "rejected: $err"

log "status subresource"
"$KUBECTL" patch widget good --subresource status --type merge -p '{"status":{"ready":true}}' >/dev/null
[[ "$("$KUBECTL" get widget good -o jsonpath='{.status.ready}')" == true ]] || fail "status patch"

# ------------------------------------------------------------------ authn
for p in /apis /api /apis/smoke.edgefleet.io/v1alpha1/namespaces/default/widgets; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$T/pki/ca.crt" "https://127.0.0.1:$API_PORT$p")
  [[ $code == 401 || $code == 403 ]] || fail "anonymous GET $p returned $code"
  echo "anonymous GET $p -> $code"
done

# ------------------------------------------------------------------ shim CRDs
log "creating Lease and Event shim CRDs"
"$KUBECTL" apply --server-side -f "$HERE/shims/lease.yaml" -f "$HERE/shims/event.yaml"
"$KUBECTL" wait --for condition=Established --timeout=30s crd/leases.coordination.k8s.io crd/events.events.k8s.io >&2
now=$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)
"$KUBECTL" apply --server-side -f - <<Y
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: smoke-leader}
spec: {holderIdentity: smoke-1, leaseDurationSeconds: 15, acquireTime: "$now", renewTime: "$now", leaseTransitions: 0}
---
apiVersion: events.k8s.io/v1
kind: Event
metadata: {name: good.smoke}
eventTime: "$now"
reportingController: edgefleet.io/smoke
reportingInstance: smoke-1
action: Reconcile
reason: Smoke
type: Normal
note: smoke test event
regarding: {apiVersion: smoke.edgefleet.io/v1alpha1, kind: Widget, name: good, namespace: default}
Y
"$KUBECTL" get leases.coordination.k8s.io
"$KUBECTL" get events.events.k8s.io
"$KUBECTL" api-resources
grep -Eq '"serverAddress": ?"127.0.0.1:' <<<"$("${CURL[@]}" "https://127.0.0.1:$API_PORT/apis")" || fail "serverAddress"
# Unaggregated discovery (what kube-rs Discovery uses) must list the CRD groups too.
apis=$("${CURL[@]}" -H 'Accept: application/json' "https://127.0.0.1:$API_PORT/apis")
for g in smoke.edgefleet.io coordination.k8s.io events.k8s.io apiextensions.k8s.io; do
  grep -Eq "\"name\": ?\"$g\"" <<<"$apis" || fail "unaggregated /apis lacks $g: $apis"
done
"${CURL[@]}" "https://127.0.0.1:$API_PORT/apis/coordination.k8s.io/v1" | grep -Eq '"name": ?"leases"' || fail "/apis/coordination.k8s.io/v1"
"${CURL[@]}" "https://127.0.0.1:$API_PORT/openapi/v2" -o /dev/null || fail "/openapi/v2"

log "OK"
