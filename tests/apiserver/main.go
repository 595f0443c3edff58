// edgefleet-test-apiserver: upstream k8s.io/apiextensions-apiserver, made to run
// standalone (without a core kube-apiserver) for integration tests.
//
// Differences from the stock apiextensions-apiserver main:
//   - no core API delegation: the shared informer factory runs over an empty fake
//     clientset (there are no Services, Namespaces, ConfigMaps, ...);
//   - admission and API priority-and-fairness are off;
//   - authentication is by client certificate (--client-ca-file) only (plus the
//     internal loopback token); authorization allows group system:masters and lets
//     anyone read /healthz, /livez, /readyz and /version; everything else is 403;
//   - it serves discovery that kube-aggregator would serve in a real cluster: /apis
//     (aggregated and unaggregated, including CRD groups) and the core group
//     (/api, /api/v1 with no resources), so kubectl and kube-rs Discovery work.
//
// It is built in GOPATH mode against Debian's golang-k8s-*-dev sources; see build.sh.
package main

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/spf13/cobra"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/authorization/path"
	"k8s.io/apiserver/pkg/authorization/union"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/version"
	netutils "k8s.io/utils/net"
)

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := newOptions()

	cmd := &cobra.Command{
		Use:   "edgefleet-test-apiserver",
		Short: "Standalone CRD-only Kubernetes API server for tests (apiextensions-apiserver " + version.Get().GitVersion + ")",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, args []string) error {
			if len(args) != 0 {
				return fmt.Errorf("unexpected arguments: %v", args)
			}
			// Advertise the bind address (e.g. 127.0.0.1) in discovery documents.
			if a := o.ServerRunOptions.AdvertiseAddress; (a == nil || a.IsUnspecified()) && !o.RecommendedOptions.SecureServing.BindAddress.IsUnspecified() {
				o.ServerRunOptions.AdvertiseAddress = o.RecommendedOptions.SecureServing.BindAddress
			}
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			if o.RecommendedOptions.Authentication.ClientCert.ClientCA == "" {
				return fmt.Errorf("--client-ca-file is required (client certificates are the only way to authenticate)")
			}
			return run(c, o)
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}

func newOptions() *options.CustomResourceDefinitionsServerOptions {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	ro := o.RecommendedOptions
	// No core kube-apiserver to talk to.
	ro.CoreAPI = nil
	ro.Admission = nil
	ro.Authorization = nil // replaced by our own authorizer in run()
	ro.Features.EnablePriorityAndFairness = false
	ro.Authentication.RemoteKubeConfigFileOptional = true
	ro.Authentication.SkipInClusterLookup = true
	// Without --tls-cert-file, generate a self-signed serving cert in memory
	// rather than under ./apiserver.local.config.
	ro.SecureServing.ServerCert.CertDirectory = ""
	return o
}

func run(c *cobra.Command, o *options.CustomResourceDefinitionsServerOptions) error {
	ro := o.RecommendedOptions
	if err := ro.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{netutils.ParseIPSloppy("127.0.0.1")}); err != nil {
		return fmt.Errorf("error creating self-signed certificates: %v", err)
	}

	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	// Empty core informers: nothing lists Services etc. from a real cluster.
	serverConfig.SharedInformerFactory = informers.NewSharedInformerFactory(fake.NewClientset(), 0)

	if err := o.ServerRunOptions.ApplyTo(&serverConfig.Config); err != nil {
		return err
	}
	if err := ro.ApplyTo(serverConfig); err != nil {
		return err
	}
	if err := o.APIEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return err
	}

	publicPaths, err := path.NewAuthorizer([]string{"/healthz", "/healthz/*", "/livez", "/livez/*", "/readyz", "/readyz/*", "/version", "/version/"})
	if err != nil {
		return err
	}
	serverConfig.Authorization.Authorizer = union.New(
		authorizerfactory.NewPrivilegedGroups(user.SystemPrivilegedGroup),
		publicPaths,
		denyAll{},
	)

	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme)
	defs := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, namer)
	serverConfig.OpenAPIConfig.Info.Title = "Kubernetes"
	serverConfig.OpenAPIConfig.Info.Version = version.Get().GitVersion
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, namer)
	serverConfig.OpenAPIV3Config.Info.Title = "Kubernetes"
	serverConfig.OpenAPIV3Config.Info.Version = version.Get().GitVersion

	config := &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*ro.Etcd, serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			MasterCount:          1,
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}

	completed := config.Complete()
	// apiextensions-apiserver turns the generic /apis handler off because in a real
	// cluster kube-aggregator serves /apis. Standalone, we need it.
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	installLegacyDiscovery(server.GenericAPIServer)
	if err := syncLegacyGroupDiscovery(server); err != nil {
		return err
	}
	return server.GenericAPIServer.PrepareRun().RunWithContext(c.Context())
}

// denyAll gives a definite "no" with a reason for everything not allowed above.
type denyAll struct{}

func (denyAll) Authorize(_ context.Context, _ authorizer.Attributes) (authorizer.Decision, string, error) {
	return authorizer.DecisionDeny, "only members of group system:masters are authorized", nil
}
