package flows

import (
	"fmt"
	"net/netip"
	"strings"
)

// Filter selects flows; empty fields match everything, and a flow must
// match every field set. Pod and IP match either end (or the translated
// tuple), so "--pod web" shows what web sent and what it received.
type Filter struct {
	// Pod is "namespace/name" or a name in any namespace.
	Pod       string `json:"pod,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	IP        string `json:"ip,omitempty"`
	Port      uint16 `json:"port,omitempty"`
	Protocol  string `json:"protocol,omitempty"`
	// Verdict matches the flow's verdict (forwarded, dropped,
	// translated, closed) or either NetworkPolicy verdict (allowed,
	// denied, open, deferred).
	Verdict    string `json:"verdict,omitempty"`
	DropReason string `json:"dropReason,omitempty"`
	Type       string `json:"type,omitempty"`
	Node       string `json:"node,omitempty"`
}

// Validate reports a malformed filter.
func (f Filter) Validate() error {
	if f.IP != "" {
		if _, err := netip.ParseAddr(f.IP); err != nil {
			return fmt.Errorf("--ip %q: %w", f.IP, err)
		}
	}
	if f.Protocol != "" {
		switch strings.ToUpper(f.Protocol) {
		case "TCP", "UDP", "ICMP", "SCTP":
		default:
			return fmt.Errorf("--protocol %q: want tcp, udp, icmp or sctp", f.Protocol)
		}
	}
	if f.Verdict != "" {
		switch f.Verdict {
		case "forwarded", "dropped", "translated", "closed", "allowed", "denied", "open", "deferred":
		default:
			return fmt.Errorf("--verdict %q: want forwarded, dropped, translated, closed, allowed, denied, open or deferred", f.Verdict)
		}
	}
	if f.Type != "" {
		switch f.Type {
		case "new", "drop", "translate", "service", "accel-end":
		default:
			return fmt.Errorf("--type %q: want new, drop, translate, service or accel-end", f.Type)
		}
	}
	return nil
}

func (f Filter) ends(fl *Flow) []*Endpoint {
	ends := []*Endpoint{&fl.Source, &fl.Destination}
	if fl.TranslatedSource != nil {
		ends = append(ends, fl.TranslatedSource)
	}
	if fl.TranslatedDestination != nil {
		ends = append(ends, fl.TranslatedDestination)
	}
	return ends
}

// Match reports whether fl passes the filter.
func (f Filter) Match(fl *Flow) bool {
	if f.Node != "" && fl.Node != f.Node {
		return false
	}
	if f.Type != "" && fl.Type != f.Type {
		return false
	}
	if f.Protocol != "" && !strings.EqualFold(fl.Protocol, f.Protocol) {
		return false
	}
	if f.DropReason != "" && fl.DropReason != f.DropReason {
		return false
	}
	if f.Verdict != "" && fl.Verdict != f.Verdict &&
		(fl.Ingress == nil || fl.Ingress.Verdict != f.Verdict) && (fl.Egress == nil || fl.Egress.Verdict != f.Verdict) {
		return false
	}
	ends := f.ends(fl)
	any := func(ok func(e *Endpoint) bool) bool {
		for _, e := range ends {
			if ok(e) {
				return true
			}
		}
		return false
	}
	if f.Pod != "" {
		ns, name, qualified := strings.Cut(f.Pod, "/")
		if !qualified {
			name, ns = f.Pod, ""
		}
		if !any(func(e *Endpoint) bool { return e.Pod == name && (ns == "" || e.Namespace == ns) }) {
			return false
		}
	}
	if f.Namespace != "" && !any(func(e *Endpoint) bool { return e.Namespace == f.Namespace }) {
		return false
	}
	if f.IP != "" {
		ip, _ := netip.ParseAddr(f.IP)
		if !any(func(e *Endpoint) bool { return e.IP == ip }) {
			return false
		}
	}
	if f.Port != 0 && !any(func(e *Endpoint) bool { return e.Port == f.Port }) {
		return false
	}
	return true
}
