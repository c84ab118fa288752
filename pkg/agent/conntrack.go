package agent

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/sinabro-io/sinabro/pkg/datapath"
)

// ConntrackConfig sizes the eBPF masquerading's connection tracking.
type ConntrackConfig struct {
	// Size is the table's capacity in entries; each flow uses two. An
	// existing pinned table keeps its size until `sinabro uninstall`.
	Size uint32
	// PortMin and PortMax bound the NAT source ports (and ICMP echo ids).
	PortMin, PortMax uint16
	// Timeouts are the idle times after which GC removes a flow.
	Timeouts datapath.Timeouts
}

// ParsePortRange reads "MIN-MAX" (e.g. "61000-65535") into c.
func (c *ConntrackConfig) ParsePortRange(s string) error {
	lo, hi, ok := strings.Cut(s, "-")
	min, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	max, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if !ok || err1 != nil || err2 != nil || min == 0 || min > max {
		return fmt.Errorf("port range %q: want MIN-MAX with 1 <= MIN <= MAX <= 65535", s)
	}
	c.PortMin, c.PortMax = uint16(min), uint16(max)
	return nil
}
