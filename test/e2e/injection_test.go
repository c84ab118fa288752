//go:build linux

package e2e

import (
	be "encoding/binary"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/agent"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestOverlayInjection sends hand-built VXLAN packets to node-1's VXLAN
// port, each carrying a UDP datagram for one of its pods with a spoofed
// inner source (an address of node-2's pod range): from the external host
// it must reach no pod (the uplink drops it: the usual "VXLAN only from
// node addresses" firewall would have, had the eBPF decapsulation not put
// packets into pods before netfilter), from the peer node-2 it must arrive.
func TestOverlayInjection(t *testing.T) {
	l, _ := newLab(t, 2, 1)
	d := newDatapathLab(t, l, "node-1")
	spoofed := netip.MustParseAddr("10.244.250.7") // no pod has it
	const port = 9977

	// A listener inside the pod's namespace (sockets stay where they were made).
	var pc net.PacketConn
	if err := netns.Do(d.podNetns, func() (err error) {
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(d.podIP, port).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	received := func(want string) bool {
		buf := make([]byte, 2048)
		deadline := time.Now().Add(2 * time.Second)
		for {
			pc.SetReadDeadline(deadline)
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return false
			}
			if string(buf[:n]) == want {
				t.Logf("pod received %q from %v", want, from)
				return true
			}
		}
	}
	send := func(fromNetns, payload string) {
		t.Helper()
		frame := vxlanPayload(uint32(agent.DefaultVXLANVNI), spoofed, d.podIP, port, []byte(payload))
		err := netns.Do(netns.Path(fromNetns), func() error {
			c, err := net.Dial("udp4", netip.AddrPortFrom(d.nodeIP, agent.DefaultVXLANPort).String())
			if err != nil {
				return err
			}
			defer c.Close()
			for range 3 {
				if _, err := c.Write(frame); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatalf("send from %s: %v", fromNetns, err)
		}
	}

	before := counterValue(t, d, "drop_vxlan_unknown_peer")
	send(labNetns("ext"), "from the external host")
	if received("from the external host") {
		t.Error("a VXLAN packet from the external host reached the pod")
	}
	if after := counterValue(t, d, "drop_vxlan_unknown_peer"); after < before+3 {
		t.Errorf("masq_ingress drop_vxlan_unknown_peer went %d → %d, want +3", before, after)
	}
	send(labNetns("node-2"), "from the peer node")
	if !received("from the peer node") {
		t.Error("a VXLAN packet from the peer node-2 did not reach the pod")
	}
}

// counterValue reads a masq_ingress counter of node-1 through `sinabro debug maps`.
func counterValue(t *testing.T, d *datapathLab, reason string) uint64 {
	t.Helper()
	out, err := exec.Command(binary, "debug", "maps", "sb_counters", "--bpf-root", d.bpfRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("debug maps: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "masq_ingress" && f[1] == reason {
			n, err := strconv.ParseUint(f[2], 10, 64)
			if err != nil {
				t.Fatalf("counter line %q: %v", line, err)
			}
			return n
		}
	}
	return 0
}

// vxlanPayload is the UDP payload of a VXLAN packet (header, inner
// Ethernet, IPv4 with a valid checksum, UDP without checksum) carrying data
// from src to dst:port.
func vxlanPayload(vni uint32, src, dst netip.Addr, port uint16, data []byte) []byte {
	b := make([]byte, 8+14+20+8+len(data))
	be.BigEndian.PutUint32(b[0:], 0x08000000)
	be.BigEndian.PutUint32(b[4:], vni<<8)
	eth := b[8:]
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 2})
	be.BigEndian.PutUint16(eth[12:], 0x0800)
	ip := eth[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, 17
	be.BigEndian.PutUint16(ip[2:], uint16(20+8+len(data)))
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(be.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	be.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := ip[20:]
	be.BigEndian.PutUint16(udp[0:], 40000)
	be.BigEndian.PutUint16(udp[2:], port)
	be.BigEndian.PutUint16(udp[4:], uint16(8+len(data)))
	copy(udp[8:], data)
	return b
}
