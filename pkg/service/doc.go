// Package service load-balances Kubernetes Services at the socket, in place
// of kube-proxy: cgroup programs (bpf/service.c) rewrite a connect() or
// sendmsg() to a Service address into one to a backend, so a pod's or the
// node's connection to a ClusterIP is set up with the backend directly and
// none of its packets is translated (which also lets same-node TCP
// acceleration see both ends). recvmsg() and getpeername() report the
// Service address back, as the application expects.
//
// The package knows nothing of Kubernetes: the agent turns Services and
// EndpointSlices into a desired map of Frontend → Entry and calls Sync.
//
// Everything lives under <Config.BPFRoot>/service:
//
//	maps/<map name>   frontends, backend sets, reverse translations, affinity, names, counters
//	links/<program>   cgroup links of connect4, sendmsg4, recvmsg4, getpeername4
//
// A restarted agent adopts the maps as they are (connections keep their
// reverse translations; Services keep answering while it starts) and
// re-points the links to its programs with link.Update. Use:
//
//	lb, err := service.Enable(ctx, service.Config{BPFRoot: root, CgroupPath: cg})
//	defer lb.Close()                 // leaves load balancing running
//	lb.SetNodeAddrs(addrs)           // where NodePorts answer
//	lb.Sync(desired)                 // after every change; writes only what changed
//
// Disable(ctx, root) detaches the programs (kube-proxy took over);
// Cleanup(root) removes everything (uninstall).
//
// Atomicity: a frontend's backends are written as a new set before the
// frontend is re-pointed to it in one map update, and the old set is
// deleted after; a connect() sees the old backends or the new ones, never
// none. The ids of sets only grow (32 bits; a set is never reused while a
// frontend may still point at it).
package service
