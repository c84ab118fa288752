// Command sinabro is Sinabro's single executable: the CNI plugin when a
// container runtime runs it (CNI_COMMAND set), and otherwise the node agent,
// installer, debug CLI and lab, chosen by subcommand or by the name it was
// invoked under (a symlink named sinabro-agent runs `sinabro agent`).
package main

import (
	"os"

	"github.com/sinabro-io/sinabro/cmd"
	"github.com/sinabro-io/sinabro/pkg/cni"
)

func main() {
	// The CNI path is decided before cobra (or anything heavy) is touched:
	// the runtime expects nothing but the result JSON on stdout, fast.
	if os.Getenv("CNI_COMMAND") != "" {
		cni.Main()
		return
	}
	os.Exit(cmd.Execute(os.Args))
}
