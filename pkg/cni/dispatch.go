package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/utils"
	cniversion "github.com/containernetworking/cni/pkg/version"
	"golang.org/x/sys/unix"
)

// MaxConfigSize bounds the network configuration read from stdin. Real ones
// (with a prevResult or a long cni.dev/valid-attachments list) are far
// smaller; the bound keeps a broken runtime from making the plugin buffer
// without end.
const MaxConfigSize = 1 << 20

// cmdArgs is one invocation's environment and stdin, as the spec defines them.
type cmdArgs struct {
	Command     string
	ContainerID string
	Netns       string
	IfName      string
	Args        string
	Path        string
	StdinData   []byte
}

// We dispatch ourselves instead of using the CNI library's skel package:
// skel links github.com/vishvananda/netns, which the binary must not carry.
// The behaviour follows skel and the spec: required variables per command
// (code 4), config decoding (6/7), version reconciliation (1).

type envVar struct {
	name     string
	required map[string]bool
	validate func(string) *types.Error
	dst      func(*cmdArgs) *string
}

var envVars = []envVar{
	{"CNI_CONTAINERID", set("ADD", "CHECK", "DEL"), utils.ValidateContainerID, func(a *cmdArgs) *string { return &a.ContainerID }},
	{"CNI_NETNS", set("ADD", "CHECK"), nil, func(a *cmdArgs) *string { return &a.Netns }},
	{"CNI_IFNAME", set("ADD", "CHECK", "DEL"), utils.ValidateInterfaceName, func(a *cmdArgs) *string { return &a.IfName }},
	{"CNI_ARGS", nil, nil, func(a *cmdArgs) *string { return &a.Args }},
	{"CNI_PATH", set("ADD", "CHECK", "DEL", "GC", "STATUS"), nil, func(a *cmdArgs) *string { return &a.Path }},
}

func set(cmds ...string) map[string]bool {
	m := map[string]bool{}
	for _, c := range cmds {
		m[c] = true
	}
	return m
}

var commands = map[string]func(*cmdArgs) error{
	"ADD":    cmdAdd,
	"DEL":    cmdDel,
	"CHECK":  cmdCheck,
	"GC":     cmdGC,
	"STATUS": cmdStatus,
}

// Main runs the CNI plugin on the process's environment and stdin; it prints
// the result, or the error as JSON, on stdout and exits non-zero on error.
func Main() {
	if err := Run(os.Getenv, os.Stdin, os.Stdout); err != nil {
		if perr := err.Print(); perr != nil {
			fmt.Fprintln(os.Stderr, "write error JSON:", perr)
		}
		os.Exit(1)
	}
}

// Run executes one CNI command. Results go to stdout; the returned error is
// what the caller prints on stdout before exiting non-zero.
func Run(getenv func(string) string, stdin io.Reader, stdout io.Writer) (retErr *types.Error) {
	defer func() {
		// A bug must still answer the runtime with JSON, not a Go stack.
		if r := recover(); r != nil {
			retErr = types.NewError(types.ErrInternal, "internal error", fmt.Sprint(r))
		}
	}()
	pluginInfo := cniversion.PluginSupports(SupportedVersions...)
	a := &cmdArgs{Command: getenv("CNI_COMMAND")}
	if a.Command == "VERSION" {
		if err := pluginInfo.Encode(stdout); err != nil {
			return types.NewError(types.ErrIOFailure, "write version", err.Error())
		}
		return nil
	}
	call, known := commands[a.Command]
	if !known {
		return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("unknown CNI_COMMAND %q", a.Command),
			"expected one of ADD, DEL, CHECK, GC, STATUS, VERSION")
	}
	var missing []string
	for _, v := range envVars {
		val := getenv(v.name)
		*v.dst(a) = val
		if val == "" {
			if v.required[a.Command] {
				missing = append(missing, v.name)
			}
			continue
		}
		if v.validate != nil && v.required[a.Command] {
			if err := v.validate(val); err != nil {
				return err
			}
		}
	}
	if len(missing) > 0 {
		return types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("required env variables [%s] missing", strings.Join(missing, ",")), "")
	}
	data, err := io.ReadAll(io.LimitReader(stdin, MaxConfigSize+1))
	if err != nil {
		return types.NewError(types.ErrIOFailure, "read network config from stdin", err.Error())
	}
	if len(data) > MaxConfigSize {
		return types.NewError(types.ErrInvalidNetworkConfig, "network config too large",
			fmt.Sprintf("stdin holds more than %d bytes", MaxConfigSize))
	}
	a.StdinData = data
	confVersion, err := (&cniversion.ConfigDecoder{}).Decode(data)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode network config", err.Error())
	}
	if err := (&cniversion.Reconciler{}).Check(confVersion, pluginInfo); err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, "incompatible CNI versions", err.Details())
	}
	if (a.Command == "GC" || a.Command == "STATUS") && !versionAtLeast(confVersion, "1.1.0") {
		return types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("%s needs cniVersion 1.1.0 or later, config has %s", a.Command, confVersion), "")
	}
	if err := checkName(data); err != nil {
		return err
	}
	if a.Netns != "" && (a.Command == "ADD" || a.Command == "CHECK") {
		if err := checkNotOwnNetns(a.Netns, getenv("CNI_NETNS_OVERRIDE")); err != nil {
			return err
		}
	}
	if err := call(a); err != nil {
		var te *types.Error
		if errors.As(err, &te) {
			return te
		}
		return types.NewError(types.ErrInternal, err.Error(), "")
	}
	return nil
}

func versionAtLeast(v, min string) bool {
	ok, err := cniversion.GreaterThanOrEqualTo(v, min)
	return err == nil && ok
}

func checkName(data []byte) *types.Error {
	var conf struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(data, &conf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode network config", err.Error())
	}
	if conf.Name == "" {
		return types.NewError(types.ErrInvalidNetworkConfig, "missing network name", "")
	}
	return utils.ValidateNetworkName(conf.Name)
}

// checkNotOwnNetns refuses to configure the plugin's own namespace (the
// node's) as a pod's, as skel does, unless the runtime insists.
func checkNotOwnNetns(path, override string) *types.Error {
	if strings.EqualFold(override, "true") || override == "1" {
		return nil
	}
	var own, target unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &own); err != nil {
		return nil
	}
	if err := unix.Stat(path, &target); err != nil {
		return nil // reported with a clear message by the command itself
	}
	if own.Dev == target.Dev && own.Ino == target.Ino {
		return types.NewError(types.ErrInvalidNetNS, "plugin's netns and netns from CNI_NETNS should not be the same", "")
	}
	return nil
}
