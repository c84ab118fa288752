// Package version holds the build version of the sinabro executable.
package version

import (
	"fmt"
	"runtime"
)

// Version is set at build time with -ldflags "-X ...version.Version=v1.2.3".
var Version = "dev"

// String is the one-line version shown by `sinabro version` and the CNI about text.
func String() string {
	return fmt.Sprintf("sinabro %s (%s, %s/%s)", Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
