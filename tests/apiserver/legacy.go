package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	genericapiserver "k8s.io/apiserver/pkg/server"
)

// installLegacyDiscovery serves the core ("legacy") group discovery: /api is a
// valid APIVersions with an empty version list (there are no core types). Clients
// such as kube-rs Discovery fail when /api is missing (404). Advertising "v1" with
// an empty /api/v1 resource list is worse: client-go then reports
// "received empty response for: v1" (kubectl api-resources fails). /api/v1 is
// still answered with an empty APIResourceList for clients that ask anyway;
// everything below /api/v1/... is 404.
func installLegacyDiscovery(s *genericapiserver.GenericAPIServer) {
	mux := s.Handler.NonGoRestfulMux
	mux.Handle("/api", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isGet(w, r) {
			return
		}
		writeJSON(w, &metav1.APIVersions{
			TypeMeta: metav1.TypeMeta{Kind: "APIVersions"},
			Versions: []string{},
			ServerAddressByClientCIDRs: []metav1.ServerAddressByClientCIDR{
				{ClientCIDR: "0.0.0.0/0", ServerAddress: r.Host},
			},
		})
	}))
	mux.Handle("/api/v1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isGet(w, r) {
			return
		}
		writeJSON(w, &metav1.APIResourceList{
			TypeMeta:     metav1.TypeMeta{Kind: "APIResourceList", APIVersion: "v1"},
			GroupVersion: "v1",
			APIResources: []metav1.APIResource{},
		})
	}))
}

func isGet(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(v)
}

// noServices resolves no webhook services: there is no core API, so CRD
// conversion webhooks can only be used with a URL, not a service reference.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s:%d cannot be resolved: this test API server has no core API", namespace, name, port)
}
