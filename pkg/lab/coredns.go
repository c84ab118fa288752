package lab

import (
	"context"
	"fmt"
	"time"

	"github.com/sinabro-io/sinabro/pkg/lab/images"
)

// Cluster DNS of real-node labs: CoreDNS as kubeadm deploys it (Deployment,
// kube-dns Service on the tenth ClusterIP, RBAC), built from the Go module
// proxy and imported like every lab image. It answers for cluster.local
// only: the lab has no upstream resolver.
const corednsManifest = `apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: system:coredns}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: system:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:coredns}
subjects:
- {kind: ServiceAccount, name: coredns, namespace: kube-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loop
        reload
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  replicas: 1
  selector:
    matchLabels: {k8s-app: kube-dns}
  template:
    metadata:
      labels: {k8s-app: kube-dns}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      tolerations:
      - {key: node-role.kubernetes.io/control-plane, effect: NoSchedule}
      containers:
      - name: coredns
        image: %s
        imagePullPolicy: IfNotPresent
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        volumeMounts:
        - {name: config, mountPath: /etc/coredns, readOnly: true}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {add: [NET_BIND_SERVICE], drop: [ALL]}
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          initialDelaySeconds: 10
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
      volumes:
      - name: config
        configMap:
          name: coredns
          items: [{key: Corefile, path: Corefile}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: %s
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
`

// deployClusterDNS applies CoreDNS and waits until it serves.
func (s *supervisor) deployClusterDNS(ctx context.Context) error {
	dns, err := s.cfg.clusterDNSIP()
	if err != nil {
		return err
	}
	s.progress.step("deploying CoreDNS (kube-system/kube-dns " + dns + ")")
	start := time.Now()
	src := fmt.Sprintf(corednsManifest, images.CoreDNSRef, dns)
	if err := applyYAML(ctx, s.cfg.certConfig(s.cfg.nsControlPlane(), "admin"), src); err != nil {
		return &componentError{"coredns", s.cfg.layout().Log("supervisor"), err}
	}
	if err := s.waitDeployment(ctx, "kube-system", "coredns", 120*time.Second); err != nil {
		return &componentError{"coredns", s.cfg.layout().Log("supervisor"), err}
	}
	s.progress.done(fmt.Sprintf("CoreDNS ready in %.1fs", time.Since(start).Seconds()))
	return nil
}
