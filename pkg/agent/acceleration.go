package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	corev1 "k8s.io/api/core/v1"
)

// AnnotationTCPAcceleration on a Pod or a Namespace turns same-node TCP
// acceleration on ("true") or off ("false") for the pod, or for the
// namespace's pods. Acceleration is opt-in: a pod whose process reads
// sockets with splice(2) (Go's io.Copy between two TCP connections, many
// proxies) does not see redirected data on current kernels and hangs, and
// nobody can tell from outside which pods do that.
//
// Precedence, first that is set wins: the pod's annotation, its
// namespace's annotation, the node's --tcp-acceleration (default false).
const AnnotationTCPAcceleration = "sinabro.io/tcp-acceleration"

// accelSetting is what an annotation asks for.
type accelSetting uint8

const (
	accelUnset accelSetting = iota
	accelOn
	accelOff
)

// accelerationSetting reads AnnotationTCPAcceleration; an unparsable value
// counts as unset and is returned as bad.
func accelerationSetting(annotations map[string]string) (s accelSetting, bad string) {
	v, ok := annotations[AnnotationTCPAcceleration]
	if !ok {
		return accelUnset, ""
	}
	on, err := strconv.ParseBool(v)
	switch {
	case err != nil:
		return accelUnset, v
	case on:
		return accelOn, ""
	default:
		return accelOff, ""
	}
}

// accelerationPlan is the content of sockmap's pod-prefix map: a socket is
// accelerated when both its ends match a prefix of Prefixes and are not
// among Excluded.
type accelerationPlan struct {
	Prefixes []netip.Prefix
	Excluded []netip.Addr
	// Warnings name annotations with a value that is neither true nor
	// false (ignored).
	Warnings []string
}

// active says whether anything can be accelerated: the programs are
// attached only then.
func (p accelerationPlan) active() bool { return len(p.Prefixes) > 0 }

// planAcceleration decides which of this node's pods are accelerated.
// With the node default on, the node's IPv4 pod CIDRs are accelerated
// minus the pods that resolve to off; with it off, only the pods that
// resolve to on, as /32s, so that a connection is accelerated only
// between two opted-in pods. Pods on the host network, finished pods
// (their address may already be another pod's) and addresses outside the
// node's pod CIDRs are ignored; when pods share an address, off wins.
func planAcceleration(nodeDefault bool, podCIDRs []netip.Prefix, pods []*corev1.Pod, namespaces map[string]*corev1.Namespace) accelerationPlan {
	var plan accelerationPlan
	var cidrs []netip.Prefix
	for _, p := range podCIDRs {
		if p.Addr().Is4() {
			cidrs = append(cidrs, p.Masked())
		}
	}
	warned := map[string]bool{}
	setting := func(kind, name string, annotations map[string]string) accelSetting {
		s, bad := accelerationSetting(annotations)
		if w := fmt.Sprintf("%s %s: %s=%q", kind, name, AnnotationTCPAcceleration, bad); bad != "" && !warned[w] {
			warned[w] = true
			plan.Warnings = append(plan.Warnings, w)
		}
		return s
	}
	on, off := map[netip.Addr]bool{}, map[netip.Addr]bool{}
	for _, pod := range pods {
		if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		accelerated := nodeDefault
		if s := setting("pod", pod.Namespace+"/"+pod.Name, pod.Annotations); s != accelUnset {
			accelerated = s == accelOn
		} else if ns := namespaces[pod.Namespace]; ns != nil {
			if s := setting("namespace", ns.Name, ns.Annotations); s != accelUnset {
				accelerated = s == accelOn
			}
		}
		for _, ip := range podIPv4s(pod) {
			if !slices.ContainsFunc(cidrs, func(p netip.Prefix) bool { return p.Contains(ip) }) {
				continue
			}
			if accelerated {
				on[ip] = true
			} else {
				off[ip] = true
			}
		}
	}
	if nodeDefault {
		plan.Prefixes = cidrs
		for ip := range off {
			plan.Excluded = append(plan.Excluded, ip)
		}
		slices.SortFunc(plan.Excluded, netip.Addr.Compare)
		return plan
	}
	for ip := range on {
		if !off[ip] {
			plan.Prefixes = append(plan.Prefixes, netip.PrefixFrom(ip, 32))
		}
	}
	slices.SortFunc(plan.Prefixes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return plan
}

// podIPv4s returns a pod's IPv4 addresses (the programs handle IPv4 and
// IPv4-mapped sockets only).
func podIPv4s(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	ips := []string{p.Status.PodIP}
	for _, ip := range p.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	for _, ip := range ips {
		if addr, err := netip.ParseAddr(ip); err == nil && addr.Is4() && !slices.Contains(out, addr) {
			out = append(out, addr)
		}
	}
	return out
}

// accelerationInputsChanged says whether a pod update can change the plan.
func accelerationInputsChanged(o, n *corev1.Pod) bool {
	terminal := func(p *corev1.Pod) bool {
		return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
	}
	return o.Annotations[AnnotationTCPAcceleration] != n.Annotations[AnnotationTCPAcceleration] ||
		!slices.Equal(podIPv4s(o), podIPv4s(n)) || terminal(o) != terminal(n)
}
