package sockmap

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/sinabro-io/sinabro/internal/tcpload"
)

// Helper processes run in pod netns (see testbed_linux_test.go): the
// internal/tcpload server and clients, which print one JSON result line.
func helperMain(kind string) int {
	addr := os.Getenv("SOCKMAP_ADDR")
	if kind == "interactive" {
		return tcpload.Interactive(addr)
	}
	// Exit when the test closes stdin, whatever we are doing.
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	switch kind {
	case "server", "http":
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("ready")
		if kind == "http" {
			err = tcpload.ServeHTTP(ln)
		} else {
			err = tcpload.Serve(ln)
		}
		fmt.Fprintln(os.Stderr, err)
		return 1
	case "client":
		b, _ := json.Marshal(tcpload.Run(addr, os.Getenv("SOCKMAP_SCENARIO")))
		fmt.Println(string(b))
		// Stay until the test has read the line and closes stdin.
		select {}
	}
	fmt.Fprintf(os.Stderr, "unknown helper %q\n", kind)
	return 2
}
