package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/sinabro-io/sinabro/pkg/kube"
)

// fallbackManifest is applied when no manifests directory is found: the
// agent's identity and the permissions it plausibly needs.
const fallbackManifest = `apiVersion: v1
kind: ServiceAccount
metadata: {name: sinabro, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: sinabro}
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch, patch, update]
- apiGroups: [""]
  resources: [nodes/status]
  verbs: [patch, update]
- apiGroups: [""]
  resources: [pods, services, endpoints, namespaces]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sinabro}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: sinabro}
subjects:
- {kind: ServiceAccount, name: sinabro, namespace: kube-system}
`

// FindManifests returns the manifests directory of a source checkout: dir
// if given, else ./manifests or one next to an ancestor of the executable.
func FindManifests(dir string) string {
	if dir != "" {
		return dir
	}
	cands := []string{"manifests"}
	if exe, err := os.Executable(); err == nil {
		for d := filepath.Dir(exe); d != "/" && d != "."; d = filepath.Dir(d) {
			cands = append(cands, filepath.Join(d, "manifests"))
		}
	}
	for _, c := range cands {
		if m, _ := filepath.Glob(filepath.Join(c, "*.yaml")); len(m) > 0 {
			abs, err := filepath.Abs(c)
			if err == nil {
				return abs
			}
		}
	}
	return ""
}

// readManifests decodes every YAML document of dir (or the fallback).
func readManifests(dir string) ([]*unstructured.Unstructured, error) {
	var sources [][]byte
	if dir == "" {
		sources = [][]byte{[]byte(fallbackManifest)}
	} else {
		files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil {
			return nil, err
		}
		sort.Strings(files)
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("read manifest: %w", err)
			}
			sources = append(sources, b)
		}
	}
	return decodeManifests(sources)
}

func decodeManifests(sources [][]byte) ([]*unstructured.Unstructured, error) {
	var objs []*unstructured.Unstructured
	for _, src := range sources {
		dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(src), 4096)
		for {
			var m map[string]any
			if err := dec.Decode(&m); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				return nil, fmt.Errorf("decode manifest: %w", err)
			}
			if len(m) == 0 {
				continue
			}
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
	return objs, nil
}

// applied is what applyManifests learned about the agent's identity.
type applied struct {
	saNamespace, saName string
	dryRun              []string // workloads validated with a server-side dry-run
}

// applyManifests applies the RBAC and other static objects with server-side
// apply and validates workloads (DaemonSet, Deployment) with a server-side
// dry-run, since the lab runs the agent itself.
func applyManifests(ctx context.Context, cfg *rest.Config, dir string, workloads bool, adapt func(*unstructured.Unstructured) error) (*applied, error) {
	objs, err := readManifests(dir)
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		if err := adapt(o); err != nil {
			return nil, fmt.Errorf("%s %s: %w", o.GetKind(), o.GetName(), err)
		}
	}
	return applyObjects(ctx, cfg, objs, workloads)
}

// realNodeNetnsDir is where a real lab node's containerd (1.x and 2.x,
// netns_mounts_under_state_dir) pins its pods' network namespaces.
const realNodeNetnsDir = "/run/containerd/io.containerd.grpc.v1.cri/netns"

// adaptManifest makes the changes a lab of real nodes needs, and no
// others:
//   - every node is a cgroup of one host, so the agent's --pod-cgroup and
//     --service-cgroup name its node's cgroup root, not the host's root,
//     which all of them share;
//   - the nodes' containerd keeps pod network namespaces under its state
//     dir (realNodeNetnsDir), not in the host's /var/run/netns, so the
//     agent's netns volume points there;
//   - without kube-proxy, nothing serves the kubernetes Service before the
//     agent does, so the agent reaches the API server at its own address
//     (the ConfigMap's k8s-service-host/-port, as a user of a cluster
//     without kube-proxy sets them).
func (c *Config) adaptManifest(o *unstructured.Unstructured) error {
	if !c.realNodes() {
		return nil
	}
	switch {
	case o.GetKind() == "DaemonSet" && o.GetName() == "sinabro":
		containers, _, err := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		if err != nil {
			return err
		}
		nodeRoot := "/host/sys/fs/cgroup/" + c.LabName() + "-$(NODE_NAME)" // = nodeCgroupRoot
		patched := 0
		for _, ct := range containers {
			m, ok := ct.(map[string]any)
			if !ok || m["name"] != "agent" {
				continue
			}
			args, _ := m["args"].([]any)
			for i, a := range args {
				for _, flag := range []string{"--pod-cgroup=", "--service-cgroup="} {
					if s, ok := a.(string); ok && strings.HasPrefix(s, flag) {
						args[i] = flag + nodeRoot
						patched++
					}
				}
			}
		}
		if patched != 2 {
			return fmt.Errorf("agent container: found %d of --pod-cgroup and --service-cgroup, want both", patched)
		}
		if err := unstructured.SetNestedSlice(o.Object, containers, "spec", "template", "spec", "containers"); err != nil {
			return err
		}
		volumes, _, err := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "volumes")
		if err != nil {
			return err
		}
		found := false
		for _, v := range volumes {
			if m, ok := v.(map[string]any); ok && m["name"] == "netns" {
				if hp, ok := m["hostPath"].(map[string]any); ok {
					hp["path"], found = realNodeNetnsDir, true
				}
			}
		}
		if !found {
			return errors.New("no hostPath volume named netns")
		}
		return unstructured.SetNestedSlice(o.Object, volumes, "spec", "template", "spec", "volumes")
	case o.GetKind() == "ConfigMap" && o.GetName() == "sinabro-config" && !c.kubeProxy():
		api := netip.AddrPortFrom(c.controlPlaneAddr(), apiPort)
		if err := unstructured.SetNestedField(o.Object, api.Addr().String(), "data", "k8s-service-host"); err != nil {
			return err
		}
		return unstructured.SetNestedField(o.Object, fmt.Sprint(api.Port()), "data", "k8s-service-port")
	}
	return nil
}

// applyYAML applies every object of a multi-document YAML, workloads too.
func applyYAML(ctx context.Context, cfg *rest.Config, src string) error {
	objs, err := decodeManifests([][]byte{[]byte(src)})
	if err != nil {
		return err
	}
	_, err = applyObjects(ctx, cfg, objs, true)
	return err
}

// applyObjects applies objs with server-side apply; workloads only with a
// dry-run unless workloads is set (real nodes run the DaemonSet; the
// kubelet stand-ins run the agent as a lab process instead).
func applyObjects(ctx context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, workloads bool) (*applied, error) {
	kc, err := kube.New(cfg, "sinabro-lab")
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	out := &applied{saNamespace: "kube-system", saName: "sinabro"}
	foundSA := false
	// Namespaces and service accounts first, so later objects can refer to them.
	sort.SliceStable(objs, func(i, j int) bool { return kindRank(objs[i].GetKind()) < kindRank(objs[j].GetKind()) })
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		gvr, namespaced, err := kc.ResourceFor(ctx, gvk)
		if err != nil {
			return nil, fmt.Errorf("map %s %s: %w", gvk.Kind, o.GetName(), err)
		}
		ri := dynamic.ResourceInterface(dyn.Resource(gvr))
		if namespaced {
			if o.GetNamespace() == "" {
				o.SetNamespace("default")
			}
			ri = dyn.Resource(gvr).Namespace(o.GetNamespace())
		}
		switch gvk.Kind {
		case "DaemonSet", "Deployment", "StatefulSet", "Job", "Pod":
			if workloads {
				break
			}
			if _, err := ri.Create(ctx, o, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
				return nil, fmt.Errorf("dry-run %s %s/%s: %w", gvk.Kind, o.GetNamespace(), o.GetName(), err)
			}
			out.dryRun = append(out.dryRun, gvk.Kind+"/"+o.GetName())
			continue
		case "ServiceAccount":
			if !foundSA {
				out.saNamespace, out.saName, foundSA = o.GetNamespace(), o.GetName(), true
			}
		}
		if _, err := ri.Apply(ctx, o.GetName(), o, metav1.ApplyOptions{FieldManager: "sinabro-lab", Force: true}); err != nil {
			return nil, fmt.Errorf("apply %s %s: %w", gvk.Kind, o.GetName(), err)
		}
	}
	return out, nil
}

func kindRank(kind string) int {
	switch kind {
	case "Namespace":
		return 0
	case "ServiceAccount":
		return 1
	case "ClusterRole", "Role":
		return 2
	case "ClusterRoleBinding", "RoleBinding":
		return 3
	}
	if strings.HasSuffix(kind, "Set") || kind == "Deployment" {
		return 5
	}
	return 4
}

// tokenTTL outlives any lab.
var tokenTTL = int64(7 * 24 * 3600)

// agentToken requests a bound service-account token for the agent.
func agentToken(ctx context.Context, cs *kube.Client, ns, name string) (string, error) {
	tr, err := cs.CreateToken(ctx, ns, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &tokenTTL},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("request token for service account %s/%s: %w", ns, name, err)
	}
	return tr.Status.Token, nil
}
