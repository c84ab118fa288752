package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/kube"
)

// dnsChecks asks cluster DNS (CoreDNS behind the kube-dns Service, real
// nodes only) from inside each test pod for the name of its own Service,
// svc-<pod>.default.svc.cluster.local, and wants its ClusterIP: a UDP query
// to a ClusterIP, translated by kube-proxy and carried by Sinabro, answered
// by a pod on some node.
func dnsChecks(ctx context.Context, cfg *Config, cs *kube.Client, pods []Endpoint, timeout time.Duration) []StateCheck {
	dns, err := cfg.clusterDNSIP()
	if err != nil {
		return []StateCheck{{What: "cluster DNS", Detail: err.Error()}}
	}
	var out []StateCheck
	for _, p := range pods {
		name := podServiceName(p.Name) + "." + podNamespace + ".svc.cluster.local"
		sc := StateCheck{What: fmt.Sprintf("DNS from %s: %s", p.Name, name)}
		svc, err := cs.Services(podNamespace).Get(ctx, podServiceName(p.Name), metav1.GetOptions{})
		if err != nil {
			sc.Detail = err.Error()
			out = append(out, sc)
			continue
		}
		got, err := lookupA(p, dns, name, timeout)
		switch {
		case err != nil:
			sc.Detail = fmt.Sprintf("query %s: %v", dns, err)
		case got.String() != svc.Spec.ClusterIP:
			sc.Detail = fmt.Sprintf("answer %s, want the ClusterIP %s", got, svc.Spec.ClusterIP)
		default:
			sc.OK, sc.Detail = true, fmt.Sprintf("%s from %s", got, dns)
		}
		out = append(out, sc)
	}
	return out
}

// lookupA sends one A query for name to server:53 over UDP from inside the
// pod src (its namespace and cgroup) and returns the first address of the answer.
func lookupA(src Endpoint, server, name string, timeout time.Duration) (netip.Addr, error) {
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: uint16(time.Now().UnixNano()), RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
	}
	req, err := q.Pack()
	if err != nil {
		return netip.Addr{}, err
	}
	conn, err := inEndpoint(src, func() (net.Conn, error) { return net.DialTimeout("udp4", net.JoinHostPort(server, "53"), timeout) })
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(req); err != nil {
		return netip.Addr{}, err
	}
	buf := make([]byte, 1500)
	n, err := conn.Read(buf)
	if err != nil {
		return netip.Addr{}, err
	}
	var resp dnsmessage.Message
	if err := resp.Unpack(buf[:n]); err != nil {
		return netip.Addr{}, err
	}
	if resp.Header.ID != q.Header.ID || resp.Header.RCode != dnsmessage.RCodeSuccess {
		return netip.Addr{}, fmt.Errorf("answer id %d rcode %v", resp.Header.ID, resp.Header.RCode)
	}
	for _, a := range resp.Answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			return netip.AddrFrom4(r.A), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no A record in the answer")
}
