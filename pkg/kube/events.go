package kube

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// EventRecorder records core/v1 Events about objects. client-go's
// record.EventRecorder satisfies it too (tests use that with a fake clientset).
type EventRecorder interface {
	Eventf(obj runtime.Object, eventtype, reason, messageFmt string, args ...any)
}

// EventRecorder returns a recorder that posts Events as component in the
// background, and the function that flushes and stops it. We write Events
// ourselves rather than through client-go's tools/record, whose strategic
// merge patch support links OpenAPI packages that slow every CNI exec's init.
// Events are best effort: when the API is slow, extra ones are dropped.
func (c *Client) EventRecorder(component string, log *slog.Logger) (EventRecorder, func()) {
	r := &eventRecorder{c: c, component: component, log: log, queue: make(chan *corev1.Event, 64)}
	r.done.Add(1)
	go r.post()
	var once sync.Once
	return r, func() { once.Do(func() { close(r.queue); r.done.Wait() }) }
}

type eventRecorder struct {
	c         *Client
	component string
	log       *slog.Logger
	queue     chan *corev1.Event
	done      sync.WaitGroup
}

func (r *eventRecorder) Eventf(obj runtime.Object, eventtype, reason, messageFmt string, args ...any) {
	m, err := meta.Accessor(obj)
	if err != nil {
		r.log.Warn("event about an object without metadata", "reason", reason, "err", err)
		return
	}
	loadScheme()
	kinds, _, err := scheme.ObjectKinds(obj)
	if err != nil || len(kinds) == 0 {
		r.log.Warn("event about an unknown kind", "reason", reason, "err", err)
		return
	}
	ns := m.GetNamespace()
	if ns == "" {
		ns = metav1.NamespaceDefault // where Events about cluster-scoped objects go, as kubelet does
	}
	now := metav1.Now()
	e := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s.%x", m.GetName(), now.UnixNano()), Namespace: ns},
		InvolvedObject: corev1.ObjectReference{
			Kind: kinds[0].Kind, APIVersion: kinds[0].GroupVersion().String(),
			Name: m.GetName(), Namespace: m.GetNamespace(), UID: m.GetUID(), ResourceVersion: m.GetResourceVersion(),
		},
		Reason: reason, Message: fmt.Sprintf(messageFmt, args...), Type: eventtype,
		Source:         corev1.EventSource{Component: r.component},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: r.component,
	}
	select {
	case r.queue <- e:
	default:
		r.log.Warn("event dropped: queue full", "reason", reason, "object", m.GetName())
	}
}

func (r *eventRecorder) post() {
	defer r.done.Done()
	for e := range r.queue {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := r.c.Events(e.Namespace).Create(ctx, e, metav1.CreateOptions{}); err != nil {
			r.log.Warn("post event", "reason", e.Reason, "object", e.InvolvedObject.Name, "err", err)
		}
		cancel()
	}
}
