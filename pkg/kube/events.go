package kube

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
)

// EventRecorder returns a recorder that writes core/v1 Events as component.
// Call the returned stop function on shutdown to flush and stop the broadcaster.
func (c *Client) EventRecorder(component string) (record.EventRecorder, func()) {
	loadScheme()
	b := record.NewBroadcaster()
	b.StartRecordingToSink(eventSink{c})
	return b.NewRecorder(scheme, corev1.EventSource{Component: component}), b.Shutdown
}

// eventSink implements record.EventSink on this package's client.
type eventSink struct{ c *Client }

func (s eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	return s.c.Events(e.Namespace).Create(context.Background(), e, metav1.CreateOptions{})
}

func (s eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	return s.c.Events(e.Namespace).Update(context.Background(), e, metav1.UpdateOptions{})
}

func (s eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	return s.c.Events(e.Namespace).Patch(context.Background(), e.Name, types.StrategicMergePatchType, data, metav1.PatchOptions{})
}
