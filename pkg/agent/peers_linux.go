package agent

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"

	"github.com/sinabro-io/sinabro/pkg/overlay"
)

// peerBounds are the limits on what peers may claim (see Bounds): the
// configured cluster CIDRs and the subnets of this node's interfaces other
// than the vxlan device dev, read from the kernel on every pass.
func (a *Agent) peerBounds(dev overlay.Link) (Bounds, error) {
	host, err := a.overlay.HostPrefixes(dev.Index)
	if err != nil {
		return Bounds{}, fmt.Errorf("read this node's addresses: %w", err)
	}
	return Bounds{ClusterCIDRs: a.cfg.ClusterCIDRs, HostPrefixes: host}, nil
}

// checkOwnPodCIDRs reports, once per problem, an own pod CIDR that peers
// would refuse: most likely --cluster-cidr differs from the
// controller-manager's, and then every peer is skipped as
// OutsideClusterCIDR too. The node still uses its own CIDR.
func (a *Agent) checkOwnPodCIDRs(n *corev1.Node, self nodeInfo) {
	skip := checkPodCIDRs(self.PodCIDRs, a.cfg.ClusterCIDRs)
	problem := ""
	if skip != nil {
		problem = skip.Reason + ": " + skip.Message
	}
	if problem == a.ownCIDRProblem {
		return
	}
	a.ownCIDRProblem = problem
	if skip == nil {
		return
	}
	a.log.Error("this node's own pod CIDR fails the checks peers must pass; is --cluster-cidr the controller-manager's?",
		"node", a.cfg.NodeName, "reason", skip.Reason, "detail", skip.Message, "cluster_cidrs", a.cfg.ClusterCIDRs)
	if a.recorder != nil {
		a.recorder.Eventf(n, corev1.EventTypeWarning, "SinabroPodCIDRRejected",
			"%s: %s; other nodes' agents skip this node (check --cluster-cidr)", skip.Reason, skip.Message)
	}
}
