package cni

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"
)

// NetworkPolicy fails closed: a pod must not run before its policies are
// in the datapath. The agent learns a new pod from its host veth (the alias
// names the pod) and writes the pod's entry into the pinned map the
// conflist names ("policyMap"); ADD waits for that entry, for this very
// veth, before it reports success.

// PolicyWait bounds the wait; the runtime retries a failed ADD.
var PolicyWait = 20 * time.Second

// podRef is the pod a runtime names in CNI_ARGS.
type podRef struct{ Namespace, Name, UID string }

// podArgs reads K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID from CNI_ARGS.
func podArgs(cniArgs string) podRef {
	var p podRef
	for _, kv := range strings.Split(cniArgs, ";") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		}
	}
	return p
}

// PodFromAlias returns the pod a host veth's alias names: its namespace
// and name, or its UID ("" when none).
func PodFromAlias(alias string) (namespace, name, uid string) {
	if _, pod, ok := strings.Cut(alias, " pod="); ok {
		namespace, name, _ = strings.Cut(pod, "/")
		return namespace, name, ""
	}
	if _, u, ok := strings.Cut(alias, " uid="); ok {
		return "", "", u
	}
	return "", "", ""
}

// waitForPolicy polls the policy map until ip's entry names hostIfindex
// (an entry for an older pod that had the address does not count).
func waitForPolicy(path string, ip netip.Addr, hostIfindex uint32) error {
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, "NetworkPolicy state unavailable",
			fmt.Sprintf("open %s (is the sinabro agent running?): %v", path, err))
	}
	defer m.Close()
	key := ip.As4()
	deadline := time.Now().Add(PolicyWait)
	for {
		// struct pol_endpoint: flags, ifindex, deny_policy[2] (bpf/lib/policy.h).
		var v [16]byte
		err := m.Lookup(key, &v)
		if err == nil && binary.NativeEndian.Uint32(v[4:8]) == hostIfindex {
			return nil
		}
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("read %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			return types.NewError(types.ErrTryAgainLater, "NetworkPolicy state of the pod not in the datapath",
				fmt.Sprintf("no entry for %s on ifindex %d in %s after %s: is the sinabro agent running on this node?", ip, hostIfindex, path, PolicyWait))
		}
		time.Sleep(10 * time.Millisecond)
	}
}
