// Package cni is Sinabro's CNI plugin: the routed pod network (a veth per
// pod, host /32 and /128 routes, no bridge) and the entry point a container
// runtime executes with CNI_COMMAND set. Addresses come from pkg/ipam.
package cni

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// PluginConf is the plugin's entry in the network configuration list.
type PluginConf struct {
	types.PluginConf
	MTU      int      `json:"mtu,omitempty"`
	PodCIDRs []string `json:"podCIDRs,omitempty"`
	DataDir  string   `json:"dataDir,omitempty"`
	// PolicyMap: see NetworkConfig.PolicyMap (under /sys/fs/bpf).
	PolicyMap string `json:"policyMap,omitempty"`
	// IPAM belongs to the plugin itself; a delegated "ipam" section is refused.
	IPAMSection json.RawMessage `json:"ipam,omitempty"`

	ranges []netip.Prefix
}

// DataDirRoot confines "dataDir": the plugin runs as root and creates and
// rewrites files wherever the network configuration points it.
const DataDirRoot = "/var/lib"

// PolicyMapRoot confines "policyMap" to bpffs.
const PolicyMapRoot = "/sys/fs/bpf"

// Plugin-specific error codes (the spec reserves 100 and up for plugins).
const (
	ErrInterfaceExists uint = 100 // CNI_IFNAME already exists in the pod netns
	ErrDrift           uint = 101 // CHECK found the attachment differs from prevResult
)

// parseConf decodes and validates the plugin configuration. Errors carry the
// spec's codes: 6 for undecodable JSON, 2 for unsupported fields, 7 for
// invalid values.
func parseConf(data []byte) (*PluginConf, error) {
	conf := &PluginConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network config", err.Error())
	}
	if len(conf.IPAMSection) > 0 && string(conf.IPAMSection) != "null" {
		return nil, types.NewError(types.ErrUnsupportedField, "unsupported field \"ipam\"",
			"sinabro allocates pod addresses itself from \"podCIDRs\"; remove the ipam section")
	}
	if conf.Type != "" && conf.Type != PluginType {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"type\"",
			fmt.Sprintf("config is for plugin %q, this is %q", conf.Type, PluginType))
	}
	if conf.MTU == 0 {
		conf.MTU = DefaultMTU
	}
	if conf.MTU < 576 || conf.MTU > 65535 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"mtu\"",
			fmt.Sprintf("mtu %d is outside 576..65535", conf.MTU))
	}
	if conf.DataDir == "" {
		conf.DataDir = DefaultDataDir
	}
	if !filepath.IsAbs(conf.DataDir) {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"dataDir\"",
			fmt.Sprintf("%q is not an absolute path", conf.DataDir))
	}
	if rel, err := filepath.Rel(DataDirRoot, conf.DataDir); err != nil || rel == "." || !filepath.IsLocal(rel) {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"dataDir\"",
			fmt.Sprintf("%q is not under %s", conf.DataDir, DataDirRoot))
	}
	conf.DataDir = filepath.Clean(conf.DataDir)
	if conf.PolicyMap != "" {
		if rel, err := filepath.Rel(PolicyMapRoot, conf.PolicyMap); err != nil || !filepath.IsLocal(rel) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"policyMap\"",
				fmt.Sprintf("%q is not under %s", conf.PolicyMap, PolicyMapRoot))
		}
	}
	var have4, have6 bool
	for _, s := range conf.PodCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"podCIDRs\"", err.Error())
		}
		if p != p.Masked() {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"podCIDRs\"",
				fmt.Sprintf("%s has host bits set (network is %s)", p, p.Masked()))
		}
		is4 := p.Addr().Is4()
		if (is4 && have4) || (!is4 && have6) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"podCIDRs\"",
				"at most one IPv4 and one IPv6 range are supported")
		}
		if (is4 && p.Bits() > 30) || (!is4 && p.Bits() > 126) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"podCIDRs\"",
				fmt.Sprintf("%s is too small for pods", p))
		}
		have4, have6 = have4 || is4, have6 || !is4
		conf.ranges = append(conf.ranges, p)
	}
	if len(conf.ranges) > 0 && !have4 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid \"podCIDRs\"", "an IPv4 range is required")
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "decode prevResult", err.Error())
		}
	}
	return conf, nil
}

// ipamDir is where the network's address state lives.
func (c *PluginConf) ipamDir() string { return filepath.Join(c.DataDir, "ipam", c.Name) }
