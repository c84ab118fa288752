package agent

import (
	"fmt"

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
