package flows

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestServe: the socket is 0600, --last answers from the buffer, a
// follower gets new flows, a bad filter gets an error.
func TestServe(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sock := filepath.Join(t.TempDir(), "run", "observe.sock")
	buf := NewBuffer(100)
	for i := 0; i < 5; i++ {
		buf.Add(Flow{Time: time.Unix(int64(i), 0), Type: "new", Source: Endpoint{Port: uint16(i)}})
	}
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, sock, buf, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	var st os.FileInfo
	for i := 0; i < 100; i++ {
		var err error
		if st, err = os.Stat(sock); err == nil && st.Mode().Perm() == 0o600 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st == nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket %s: %v, want mode 0600", sock, st)
	}
	var got []Flow
	collect := func(f Flow) error { got = append(got, f); return nil }
	if err := Observe(ctx, sock, Request{Last: 2}, collect); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Source.Port != 3 || got[1].Source.Port != 4 {
		t.Errorf("--last 2 = %v, want ports 3 and 4", got)
	}
	if err := Observe(ctx, sock, Request{Filter: Filter{Verdict: "maybe"}}, collect); err == nil {
		t.Error("a bad filter: no error")
	}
	fctx, fcancel := context.WithCancel(ctx)
	got = nil
	followed := make(chan error, 1)
	go func() {
		followed <- Observe(fctx, sock, Request{Last: -1, Follow: true, Filter: Filter{Port: 9}}, func(f Flow) error {
			got = append(got, f)
			fcancel()
			return nil
		})
	}()
	time.Sleep(100 * time.Millisecond) // subscribed
	buf.Add(Flow{Type: "new", Source: Endpoint{Port: 8}})
	buf.Add(Flow{Type: "new", Source: Endpoint{Port: 9}})
	select {
	case err := <-followed:
		if err != nil || len(got) != 1 || got[0].Source.Port != 9 {
			t.Errorf("follow: %v, %v; want the flow of port 9 only", err, got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("follower got nothing")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}
