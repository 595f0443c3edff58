package main

import (
	"sort"
	"sync"

	"k8s.io/apiextensions-apiserver/pkg/apihelpers"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// syncLegacyGroupDiscovery keeps the unaggregated /apis group list (APIGroupList)
// in step with the established CRDs.
//
// apiextensions-apiserver only feeds CRD groups into the *aggregated* discovery
// document and /apis/<group>; in a real cluster kube-aggregator builds the plain
// /apis list. Standalone, that list would only show apiextensions.k8s.io, which
// breaks clients that use unaggregated discovery (e.g. kube-rs Discovery).
func syncLegacyGroupDiscovery(s *apiserver.CustomResourceDefinitions) error {
	// The generic server's /apis handler (re-enabled in run()) serves this manager.
	mgr := s.GenericAPIServer.DiscoveryGroupManager
	crds := s.Informers.Apiextensions().V1().CustomResourceDefinitions()
	lister := crds.Lister()

	var mu sync.Mutex
	added := map[string]bool{}
	resync := func() {
		mu.Lock()
		defer mu.Unlock()
		list, err := lister.List(labels.Everything())
		if err != nil {
			klog.Errorf("legacy discovery: listing CRDs: %v", err)
			return
		}
		versions := map[string]map[string]bool{}
		for _, crd := range list {
			if !apihelpers.IsCRDConditionTrue(crd, apiextensionsv1.Established) {
				continue
			}
			g := crd.Spec.Group
			for _, v := range crd.Spec.Versions {
				if !v.Served {
					continue
				}
				if versions[g] == nil {
					versions[g] = map[string]bool{}
				}
				versions[g][v.Name] = true
			}
		}
		for g, vs := range versions {
			names := make([]string, 0, len(vs))
			for v := range vs {
				names = append(names, v)
			}
			// Newest (GA > beta > alpha, higher numbers first) is preferred, as upstream.
			sort.Slice(names, func(i, j int) bool { return version.CompareKubeAwareVersionStrings(names[i], names[j]) > 0 })
			group := metav1.APIGroup{Name: g}
			for _, v := range names {
				group.Versions = append(group.Versions, metav1.GroupVersionForDiscovery{GroupVersion: g + "/" + v, Version: v})
			}
			group.PreferredVersion = group.Versions[0]
			mgr.AddGroup(group) // replaces an existing entry of the same name
			added[g] = true
		}
		for g := range added {
			if _, ok := versions[g]; !ok {
				mgr.RemoveGroup(g)
				delete(added, g)
			}
		}
	}
	_, err := crds.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { resync() },
		UpdateFunc: func(interface{}, interface{}) { resync() },
		DeleteFunc: func(interface{}) { resync() },
	})
	return err
}
