package cni_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/sinabro-io/sinabro/pkg/cni"
)

// TestConfListVersions drives the conflist the agent writes through libcni:
// it says cniVersion 1.0.0 for runtimes on older CNI libraries and offers
// 1.1.0 in cniVersions, which libcni ≥ 1.2 picks, so STATUS and GC work.
// A runtime that reads only cniVersion (emulated by forcing the list's
// version) still adds and deletes pods.
func TestConfListVersions(t *testing.T) {
	b := newBed(t, "1.1.0")
	b.name = cni.NetworkName
	data, err := cni.ConfList(cni.NetworkConfig{PodCIDRs: []string{"10.88.12.0/24"}, DataDir: b.dataDir})
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		CNIVersion  string   `json:"cniVersion"`
		CNIVersions []string `json:"cniVersions"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatal(err)
	}
	if raw.CNIVersion != "1.0.0" || fmt.Sprint(raw.CNIVersions) != "[1.0.0 1.1.0]" {
		t.Errorf("conflist versions = %q %q, want \"1.0.0\" [1.0.0 1.1.0]", raw.CNIVersion, raw.CNIVersions)
	}
	b.list, err = libcni.ConfListFromBytes(data)
	if err != nil {
		t.Fatalf("libcni cannot read the conflist: %v", err)
	}
	if b.list.CNIVersion != "1.1.0" {
		t.Errorf("libcni runs the network at %s, want 1.1.0", b.list.CNIVersion)
	}

	status := func() error {
		return b.inNode(func() error { return b.cni.GetStatusNetworkList(context.Background(), b.list) })
	}
	if err := status(); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	p := newNetns(t, "sbt-pod-")
	b.mustAdd("v11", p)
	if err := b.gc(); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if v := b.hostVeths(); len(v) != 0 {
		t.Errorf("host veths after GC without valid attachments: %v", v)
	}

	// What a runtime on libcni < 1.2 sees: cniVersion only.
	b.list.CNIVersion = cni.ConfVersion
	old := newNetns(t, "sbt-pod-")
	var res types.Result
	err = b.inNode(func() (err error) {
		res, err = b.cni.AddNetworkList(context.Background(), b.list, rt("v10", old))
		return err
	})
	if err != nil {
		t.Fatalf("ADD for an old runtime: %v", err)
	}
	if res.Version() != "1.0.0" {
		t.Errorf("ADD result version for an old runtime = %s, want 1.0.0", res.Version())
	}
	if err := b.check("v10", old); err != nil {
		t.Errorf("CHECK for an old runtime: %v", err)
	}
	if err := b.del("v10", old); err != nil {
		t.Errorf("DEL for an old runtime: %v", err)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("addresses left: %v", a)
	}
}
