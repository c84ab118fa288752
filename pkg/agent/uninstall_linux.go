package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/jsimonetti/rtnetlink/v2"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/cni"
)

// UninstallConfig says where Sinabro's pieces are on a node.
type UninstallConfig struct {
	BPFRoot     string // the agent's --bpf-root
	VXLANDevice string // the agent's --vxlan-device
	CNIBinDir   string // where `sinabro install` copied the plugin
	CNIBinName  string // its file name there ("" is cni.DefaultBinName)
	CNIConfDir  string // where the agent wrote the conflist
	StateDir    string // agent and IPAM state; "" keeps it
}

// Uninstall removes everything Sinabro put on the node, in the calling
// thread's network namespace (the node's): the eBPF datapath and TCP
// acceleration (programs on every interface, tcx or classic tc, and every
// pin under BPFRoot), the vxlan device, the agent's routes (protocol 201)
// and masquerade table, the pods' host veths (alias "sinabro:…") and routes
// (protocol 200), the conflist, the plugin executable and the state
// directory. It needs no API server, and it is idempotent: a second run
// finds nothing to do. Pods still on the node lose their network, and
// their sandboxes cannot run CNI DEL once the plugin is gone: delete them
// first.
func Uninstall(ctx context.Context, cfg UninstallConfig, log *slog.Logger) error {
	var errs []error
	// Programs first: nothing runs on maps or devices being removed.
	if err := Cleanup(ctx, cfg.VXLANDevice, cfg.BPFRoot); err != nil {
		errs = append(errs, err)
	}
	veths, routes, err := removePodNetworking()
	errs = append(errs, err)
	log.Info("removed the pods' host interfaces and routes", "interfaces", veths, "routes", routes)
	if cfg.CNIConfDir != "" {
		errs = append(errs, removeFile(filepath.Join(cfg.CNIConfDir, cni.ConfListName), log))
	}
	if cfg.CNIBinDir != "" {
		name := cfg.CNIBinName
		if name == "" {
			name = cni.DefaultBinName
		}
		errs = append(errs, removeFile(filepath.Join(cfg.CNIBinDir, name), log))
	}
	if cfg.StateDir != "" {
		errs = append(errs, removeContents(cfg.StateDir, log))
	}
	return errors.Join(errs...)
}

// removePodNetworking deletes the host veths the CNI plugin created (found
// by their alias, which names the attachment) and every route marked with
// the plugin's protocol.
func removePodNetworking() (veths, routes int, err error) {
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return 0, 0, fmt.Errorf("dial rtnetlink: %w", err)
	}
	defer c.Close()
	var errs []error
	links, err := c.Link.List()
	if err != nil {
		return 0, 0, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if !isHostVeth(&l) {
			continue
		}
		// Deleting one end of a veth deletes both, and its routes.
		if err := c.Link.Delete(l.Index); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete pod interface %s: %w", l.Attributes.Name, err))
			continue
		}
		veths++
	}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		msgs, err := c.Route.ListMatch(&rtnetlink.RouteMessage{Family: fam, Protocol: cni.RouteProtocol, Table: unix.RT_TABLE_MAIN})
		if err != nil {
			errs = append(errs, fmt.Errorf("list pod routes: %w", err))
			continue
		}
		for _, r := range msgs {
			if r.Protocol != cni.RouteProtocol || r.Flags&unix.RTM_F_CLONED != 0 {
				continue
			}
			if err := c.Route.Delete(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete pod route to %v/%d: %w", r.Attributes.Dst, r.DstLength, err))
				continue
			}
			routes++
		}
	}
	return veths, routes, errors.Join(errs...)
}

func removeFile(path string, log *slog.Logger) error {
	err := os.Remove(path)
	switch {
	case err == nil:
		log.Info("removed", "path", path)
	case errors.Is(err, os.ErrNotExist):
	default:
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// removeContents empties dir and removes it; a dir that is a mount point
// (the DaemonSet's hostPath) stays, empty.
func removeContents(dir string, log *slog.Logger) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list %s: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, unix.EBUSY) {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	if len(errs) == 0 {
		log.Info("removed", "path", dir)
	}
	return errors.Join(errs...)
}
