package lab

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestProcsRestart checks a killed process is restarted with a new pid and
// its pid file follows, and that stop ends it for good.
func TestProcsRestart(t *testing.T) {
	l := Layout{Dir: t.TempDir()}
	p := newProcs(l)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := p.start(ctx, procSpec{name: "sleeper", argv: []string{"/bin/sleep", "30"}, restart: true}); err != nil {
		t.Fatal(err)
	}
	pid, ok := p.running("sleeper")
	if !ok {
		t.Fatal("sleeper not running after start")
	}
	if got := readPidFile(t, p.pidFile("sleeper")); got != pid {
		t.Errorf("pid file = %d, want %d", got, pid)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	var newPid int
	for time.Now().Before(deadline) {
		if np, ok := p.running("sleeper"); ok && np != pid {
			newPid = np
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if newPid == 0 {
		t.Fatalf("sleeper not restarted: %+v", p.states())
	}
	if st := p.states(); len(st) != 1 || st[0].Restarts != 1 || !strings.Contains(st[0].LastExit, "killed") {
		t.Errorf("states = %+v, want one process, 1 restart, last exit killed", st)
	}
	p.stop("sleeper")
	if _, ok := p.running("sleeper"); ok {
		t.Error("sleeper still known after stop")
	}
	if err := syscall.Kill(newPid, 0); err == nil {
		t.Errorf("pid %d still alive after stop", newPid)
	}
	if _, err := os.Stat(p.pidFile("sleeper")); err == nil {
		t.Error("pid file left after stop")
	}
	log, _ := os.ReadFile(filepath.Join(l.Logs(), "sleeper.log"))
	if got := strings.Count(string(log), " start "); got != 2 {
		t.Errorf("log has %d start lines, want 2:\n%s", got, log)
	}
}

func readPidFile(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
