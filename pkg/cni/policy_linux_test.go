package cni

import (
	"strings"
	"testing"
)

// TestPodInAlias: the host veth's alias names the pod for the agent (its
// NetworkPolicy state is what ADD waits for); a name too long for the
// alias gives way to the UID.
func TestPodInAlias(t *testing.T) {
	cid := strings.Repeat("c", 64)
	for _, c := range []struct {
		args          string
		ns, name, uid string
	}{
		{"IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-1;K8S_POD_UID=0b6c", "team-a", "web-1", ""},
		{"K8S_POD_NAMESPACE=" + strings.Repeat("n", 63) + ";K8S_POD_NAME=" + strings.Repeat("p", 200) + ";K8S_POD_UID=9f1e2d3c-0000-4000-8000-000000000001",
			"", "", "9f1e2d3c-0000-4000-8000-000000000001"},
		{"", "", "", ""},
	} {
		alias := hostVethAlias(cid, "eth0", podArgs(c.args))
		if len(alias) > 255 || !strings.HasPrefix(alias, aliasPrefix+cid+"/eth0") {
			t.Errorf("alias %q (%d bytes)", alias, len(alias))
		}
		ns, name, uid := PodFromAlias(alias)
		if ns != c.ns || name != c.name || uid != c.uid {
			t.Errorf("CNI_ARGS %q: alias names %q/%q uid %q, want %q/%q uid %q", c.args, ns, name, uid, c.ns, c.name, c.uid)
		}
	}
}
