package flows

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Flow is one event as `sinabro observe` shows it (and -o json prints it).
type Flow struct {
	Time time.Time `json:"time"`
	// Node is the node whose datapath reported the event.
	Node string `json:"node"`
	// Type: new (a flow's first packet), drop, translate (a NAT entry:
	// masquerading or a Service from outside), service (a socket's
	// Service translation), accel-end (an accelerated connection closed).
	Type string `json:"type"`
	// Verdict: forwarded, dropped, translated or closed.
	Verdict  string `json:"verdict"`
	Protocol string `json:"protocol"`

	Source      Endpoint `json:"source"`
	Destination Endpoint `json:"destination"`
	// The tuple after translation (translate, service).
	TranslatedSource      *Endpoint `json:"translatedSource,omitempty"`
	TranslatedDestination *Endpoint `json:"translatedDestination,omitempty"`

	// DropReason says why a packet was dropped (the datapath's reason
	// names, as on /metrics); Path where a new flow's first packet went
	// (redirect_local, encap, redirect_tunnel, redirect_neigh,
	// pass_stack, pass_kernel_nat); Reason for translate (snat_new,
	// lb_new).
	DropReason string `json:"dropReason,omitempty"`
	Path       string `json:"path,omitempty"`
	Reason     string `json:"reason,omitempty"`
	// OverlayNode is the node a new flow was encapsulated to.
	OverlayNode string `json:"overlayNode,omitempty"`
	// NetworkPolicy's verdicts, per direction judged on this node.
	Ingress *PolicyVerdict `json:"ingress,omitempty"`
	Egress  *PolicyVerdict `json:"egress,omitempty"`
	// Service is the Service a service or translate event reached.
	Service string `json:"service,omitempty"`
	// Bytes: redirected at socket level (accel-end), the packet (drop).
	Bytes        uint64 `json:"bytes,omitempty"`
	SocketCookie uint64 `json:"socketCookie,omitempty"`
	Program      string `json:"program,omitempty"`
	Interface    int    `json:"ifindex,omitempty"`
	// SampledOutBefore counts events of this class the datapath left out
	// on its CPU, just before this one, to keep within its rate.
	SampledOutBefore uint32 `json:"sampledOutBefore,omitempty"`
}

// Endpoint is one end of a flow.
type Endpoint struct {
	IP        netip.Addr `json:"ip,omitzero"`
	Port      uint16     `json:"port,omitempty"`
	Namespace string     `json:"namespace,omitempty"`
	Pod       string     `json:"pod,omitempty"`
	// Node names a node's own address.
	Node string `json:"node,omitempty"`
}

// PolicyVerdict is one direction's NetworkPolicy verdict: open (the pod is
// not isolated), allowed (by Rule of Policy), denied (Policy is the one
// blamed), deferred (to a Service address kube-proxy translates).
type PolicyVerdict struct {
	Verdict string `json:"verdict"`
	Policy  string `json:"policy,omitempty"`
	Rule    string `json:"rule,omitempty"`
}

// Namer gives names to what events carry as numbers. Every method may
// answer "" (unknown).
type Namer interface {
	// Pod names the pod with this address.
	Pod(ip netip.Addr) (namespace, name string)
	// Node names the node with this address (internal or underlay).
	Node(ip netip.Addr) string
	// Rule names a NetworkPolicy rule: its policy and the rule's text.
	Rule(id uint32) (policy, rule string)
	// Policy names a NetworkPolicy ("namespace/name").
	Policy(id uint32) string
	// Service names the Service ("namespace/name") with this frontend.
	Service(ip netip.Addr, port uint16, protocol string) string
}

// Names are the datapath's enums (from its BTF: the metrics' names).
type Names struct {
	Reasons  map[uint32]string
	Programs map[uint32]string
}

var typeNames = map[uint8]string{TypeNew: "new", TypeDrop: "drop", TypeTranslate: "translate", TypeService: "service", TypeAccelEnd: "accel-end"}
var typeVerdicts = map[uint8]string{TypeNew: "forwarded", TypeDrop: "dropped", TypeTranslate: "translated", TypeService: "translated", TypeAccelEnd: "closed"}
var verdictNames = map[uint8]string{VerdictOpen: "open", VerdictAllowed: "allowed", VerdictDenied: "denied", VerdictDeferred: "deferred"}

// ProtocolName names an IP protocol number.
func ProtocolName(p uint8) string {
	switch p {
	case 1:
		return "ICMP"
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", p)
}

// Build turns a decoded event into a Flow; boot is the wall time of the
// monotonic clock's zero (bpf_ktime_get_ns counts from it).
func Build(r Raw, node string, boot time.Time, names Names, n Namer) Flow {
	f := Flow{
		Time:             boot.Add(time.Duration(r.TS)),
		Node:             node,
		Type:             typeNames[r.Type],
		Verdict:          typeVerdicts[r.Type],
		Protocol:         ProtocolName(r.Proto),
		Source:           endpoint(r.Src, r.SPort, n),
		Destination:      endpoint(r.Dst, r.DPort, n),
		Interface:        int(r.Ifindex),
		SampledOutBefore: r.Suppressed,
	}
	if f.Type == "" {
		f.Type = fmt.Sprintf("type-%d", r.Type)
	}
	if r.Type != TypeService && r.Type != TypeAccelEnd {
		f.Program = names.Programs[uint32(r.Prog)]
	}
	reason := names.Reasons[uint32(r.Reason)]
	switch r.Type {
	case TypeNew:
		f.Path = reason
		if r.Node.IsValid() {
			if f.OverlayNode = n.Node(r.Node); f.OverlayNode == "" {
				f.OverlayNode = r.Node.String()
			}
		}
	case TypeDrop:
		f.DropReason = reason
		f.Bytes = r.Bytes
	case TypeTranslate:
		f.Reason = reason
	case TypeAccelEnd:
		f.Bytes = r.Bytes
		f.SocketCookie = r.Cookie
	case TypeService:
		f.SocketCookie = r.Cookie
	}
	if r.Type == TypeTranslate || r.Type == TypeService {
		xs, xd := endpoint(r.XSrc, r.XSPort, n), endpoint(r.XDst, r.XDPort, n)
		f.TranslatedSource, f.TranslatedDestination = &xs, &xd
		if r.Type == TypeService || f.Reason == "lb_new" {
			f.Service = n.Service(r.Dst, r.DPort, f.Protocol)
		}
	}
	f.Ingress = policyVerdict(r.Verdict[0], r.Rule[0], n)
	f.Egress = policyVerdict(r.Verdict[1], r.Rule[1], n)
	return f
}

func endpoint(ip netip.Addr, port uint16, n Namer) Endpoint {
	e := Endpoint{IP: ip, Port: port}
	if !ip.IsValid() {
		return e
	}
	if e.Namespace, e.Pod = n.Pod(ip); e.Pod == "" {
		e.Node = n.Node(ip)
	}
	return e
}

func policyVerdict(v uint8, id uint32, n Namer) *PolicyVerdict {
	if v == VerdictNone {
		return nil
	}
	pv := &PolicyVerdict{Verdict: verdictNames[v]}
	switch v {
	case VerdictAllowed:
		pv.Policy, pv.Rule = n.Rule(id)
	case VerdictDenied:
		pv.Policy = n.Policy(id)
	}
	return pv
}

// String is the human line `sinabro observe` prints.
func (f Flow) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %-9s %s -> %s %s", f.Time.Format("Jan _2 15:04:05.000"), f.Node, strings.ToUpper(f.Type),
		f.Source.String(), f.Destination.String(), f.Protocol)
	if f.TranslatedDestination != nil || f.TranslatedSource != nil {
		fmt.Fprintf(&b, " => %s -> %s", f.TranslatedSource.String(), f.TranslatedDestination.String())
	}
	if f.Service != "" {
		fmt.Fprintf(&b, " service %s", f.Service)
	}
	switch {
	case f.DropReason != "":
		fmt.Fprintf(&b, " DROPPED (%s)", f.DropReason)
	case f.Path != "":
		fmt.Fprintf(&b, " %s", f.Path)
	case f.Reason != "":
		fmt.Fprintf(&b, " %s", f.Reason)
	}
	if f.OverlayNode != "" {
		fmt.Fprintf(&b, " to node %s", f.OverlayNode)
	}
	for _, d := range []struct {
		name string
		v    *PolicyVerdict
	}{{"egress", f.Egress}, {"ingress", f.Ingress}} {
		if d.v == nil {
			continue
		}
		fmt.Fprintf(&b, " %s %s", d.name, d.v.Verdict)
		if d.v.Policy != "" {
			fmt.Fprintf(&b, " by %s", d.v.Policy)
		}
		if d.v.Rule != "" {
			fmt.Fprintf(&b, " (%s)", d.v.Rule)
		}
	}
	if f.Bytes != 0 && f.Type == "accel-end" {
		fmt.Fprintf(&b, " %d bytes redirected", f.Bytes)
	}
	if f.SampledOutBefore != 0 {
		fmt.Fprintf(&b, " [%d sampled out before]", f.SampledOutBefore)
	}
	return b.String()
}

// String prints an endpoint as ns/pod ip:port, node ip:port or ip:port.
func (e *Endpoint) String() string {
	if e == nil || !e.IP.IsValid() {
		if e != nil && e.Port != 0 {
			return fmt.Sprintf("*:%d", e.Port)
		}
		return "*"
	}
	addr := e.IP.String()
	if e.Port != 0 {
		addr = netip.AddrPortFrom(e.IP, e.Port).String()
	}
	switch {
	case e.Pod != "":
		return e.Namespace + "/" + e.Pod + " " + addr
	case e.Node != "":
		return "node " + e.Node + " " + addr
	}
	return addr
}
