//go:build linux

package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/sinabro-io/sinabro/internal/tcpload"
)

// The acceleration test runs its traffic as pod processes would: this test
// binary, re-executed inside a pod's network namespace and its node's pod
// cgroup, as an internal/tcpload server (one per pod) or as a client
// running one scenario. SINABRO_E2E_HELPER selects the role (see TestMain).
const (
	helperEnv    = "SINABRO_E2E_HELPER"
	workloadPort = 7100 // tcpload.Serve
	httpPort     = 7101 // tcpload.ServeHTTP
)

func helperMain(role string) int {
	addr := os.Getenv("SINABRO_E2E_ADDR")
	switch role {
	case "server":
		raw, err := net.Listen("tcp4", net.JoinHostPort(addr, strconv.Itoa(workloadPort)))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		web, err := net.Listen("tcp4", net.JoinHostPort(addr, strconv.Itoa(httpPort)))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go tcpload.ServeHTTP(web)
		fmt.Println("ready")
		fmt.Fprintln(os.Stderr, tcpload.Serve(raw))
		return 1
	case "dial": // one TCP connection, as a pod's process (netpol_test.go)
		c, err := net.DialTimeout("tcp4", addr, 1500*time.Millisecond)
		if err != nil {
			fmt.Println(err)
			return 1
		}
		c.Close()
		fmt.Println("ok")
		return 0
	case "client":
		scenario := os.Getenv("SINABRO_E2E_SCENARIO")
		port := workloadPort
		if strings.HasPrefix(scenario, "http:") {
			port = httpPort
		}
		json.NewEncoder(os.Stdout).Encode(tcpload.Run(net.JoinHostPort(addr, strconv.Itoa(port)), scenario))
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown %s=%q\n", helperEnv, role)
	return 2
}
