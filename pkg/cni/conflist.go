package cni

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
)

// Defaults shared by the installer, the agent and the plugin.
const (
	NetworkName    = "sinabro"
	PluginType     = "sinabro"
	ConfListName   = "10-sinabro.conflist"
	DefaultDataDir = "/var/lib/sinabro"
	DefaultMTU     = 1450 // a 1500-byte underlay minus 50 bytes of VXLAN overhead
	DefaultConfDir = "/etc/cni/net.d"
	DefaultBinDir  = "/opt/cni/bin"
	DefaultBinName = "sinabro"
)

// ConfVersion is the conflist's cniVersion, the one runtimes on CNI
// libraries older than 1.2 use: they ignore cniVersions, and those before
// libcni 1.2 cannot handle spec 1.1.0 results.
const ConfVersion = "1.0.0"

// ConfVersions are advertised in the conflist's cniVersions: libcni 1.2 and
// later run the network at the highest one it supports, which STATUS and
// GC need (1.1.0).
var ConfVersions = []string{"1.0.0", "1.1.0"}

// NetworkConfig is what the installer and the agent put into the conflist
// for this node.
type NetworkConfig struct {
	MTU      int      // pod interface MTU; 0 means DefaultMTU
	PodCIDRs []string // the node's pod CIDRs (one IPv4, optionally one IPv6)
	DataDir  string   // where IPAM keeps its state; "" means DefaultDataDir
	// PortMap chains the reference portmap plugin after ours, for pods'
	// hostPort (the runtime passes the mappings as its portMappings
	// capability).
	PortMap bool
	// PolicyMap is the agent's pinned map of pods' NetworkPolicy state:
	// ADD returns only once the new pod has its entry (fail closed).
	PolicyMap string
}

// PortMapPlugin is the name of the reference plugin that implements
// hostPort.
const PortMapPlugin = "portmap"

// ConfList renders the CNI network configuration list for cfg.
func ConfList(cfg NetworkConfig) ([]byte, error) {
	plugin := map[string]any{"type": PluginType}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	plugin["mtu"] = mtu
	if len(cfg.PodCIDRs) > 0 {
		plugin["podCIDRs"] = cfg.PodCIDRs
	}
	if cfg.DataDir != "" {
		plugin["dataDir"] = cfg.DataDir
	}
	if cfg.PolicyMap != "" {
		plugin["policyMap"] = cfg.PolicyMap
	}
	list := map[string]any{
		"cniVersion":  ConfVersion,
		"cniVersions": ConfVersions,
		"name":        NetworkName,
		"plugins":     []any{plugin},
	}
	if cfg.PortMap {
		list["plugins"] = []any{plugin, map[string]any{
			"type":         PortMapPlugin,
			"capabilities": map[string]bool{"portMappings": true},
		}}
	}
	return json.MarshalIndent(list, "", "  ")
}

// WriteConfList atomically writes the conflist for cfg into dir (temp file,
// fsync, rename) so a runtime never reads a half-written file. It leaves the
// file untouched when its content is already right.
func WriteConfList(dir string, cfg NetworkConfig) (path string, err error) {
	data, err := ConfList(cfg)
	if err != nil {
		return "", fmt.Errorf("render conflist: %w", err)
	}
	path = filepath.Join(dir, ConfListName)
	if old, err := os.ReadFile(path); err == nil && string(old) == string(data) {
		return path, nil
	}
	if err := atomicfile.Write(path, data, 0o644); err != nil {
		return "", fmt.Errorf("write conflist %s: %w", path, err)
	}
	return path, nil
}
