package cmd

import (
	"slices"
	"testing"
)

func TestArgsFor(t *testing.T) {
	tests := []struct {
		argv []string
		want []string
	}{
		{[]string{"/usr/bin/sinabro", "agent", "--node-name", "n1"}, []string{"agent", "--node-name", "n1"}},
		{[]string{"/usr/local/bin/sinabro-agent", "--node-name", "n1"}, []string{"agent", "--node-name", "n1"}},
		{[]string{"sinabro-debug", "maps"}, []string{"debug", "maps"}},
		{[]string{"sinabro-"}, []string{}},
		{[]string{"/opt/cni/bin/sinabro"}, []string{}},
		{nil, nil},
	}
	for _, tc := range tests {
		if got := argsFor(tc.argv); !slices.Equal(got, tc.want) {
			t.Errorf("argsFor(%q) = %q, want %q", tc.argv, got, tc.want)
		}
	}
}

func TestSubcommands(t *testing.T) {
	root := newRootCmd()
	for _, name := range []string{"agent", "install", "uninstall", "debug", "lab", "version", "completion"} {
		root.InitDefaultCompletionCmd()
		if c, _, err := root.Find([]string{name}); err != nil || c.Name() != name {
			t.Errorf("subcommand %q: got %v, %v", name, c, err)
		}
	}
}

// Same-node TCP acceleration can hang pods that read with splice(2), and
// nobody can tell which do: it is opt-in, off unless the node or a pod asks.
func TestAgentTCPAccelerationOffByDefault(t *testing.T) {
	f := newAgentCmd().Flags().Lookup("tcp-acceleration")
	if f == nil {
		t.Fatal("no --tcp-acceleration flag")
	}
	if f.DefValue != "false" {
		t.Errorf("--tcp-acceleration defaults to %s, want false", f.DefValue)
	}
}

func TestDebugPreflightRegistered(t *testing.T) {
	root := newRootCmd()
	if c, _, err := root.Find([]string{"debug", "preflight"}); err != nil || c.Name() != "preflight" {
		t.Errorf("debug preflight: got %v, %v", c, err)
	}
}
