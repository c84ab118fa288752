package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// procSpec is a process the supervisor keeps running.
type procSpec struct {
	name    string   // component name, also the log and pid file name
	netns   string   // lab namespace to run in; "" is the supervisor's own
	argv    []string // argv[0] is the executable path
	env     []string // added to the supervisor's environment
	restart bool     // restart when it exits (with backoff)
	cgroup  string   // cgroup v2 directory to start it in; "" inherits the supervisor's
}

// procState is what `lab status` shows about a process.
type procState struct {
	Name     string    `json:"name"`
	Netns    string    `json:"netns,omitempty"`
	PID      int       `json:"pid"`
	Running  bool      `json:"running"`
	Restarts int       `json:"restarts"`
	Started  time.Time `json:"started"`
	LastExit string    `json:"lastExit,omitempty"`
	Log      string    `json:"log"`
}

type managed struct {
	spec   procSpec
	cancel context.CancelFunc
	done   chan struct{}

	mu    sync.Mutex
	state procState
	proc  *os.Process
}

// procs owns the lab's child processes. Each runs under a goroutine that
// restarts it when it exits, until stop is called.
type procs struct {
	layout Layout
	wg     sync.WaitGroup

	mu    sync.Mutex
	procs map[string]*managed
}

func newProcs(l Layout) *procs {
	return &procs{layout: l, procs: map[string]*managed{}}
}

// start launches spec and waits until the first exec succeeded.
func (p *procs) start(ctx context.Context, spec procSpec) error {
	p.mu.Lock()
	if _, ok := p.procs[spec.name]; ok {
		p.mu.Unlock()
		return nil
	}
	// Processes outlive the caller's context: only stop and stopAll end
	// them, so the supervisor can stop them in order (pods before the
	// apiserver before etcd) when it is told to shut down.
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	m := &managed{spec: spec, cancel: cancel, done: make(chan struct{})}
	m.state = procState{Name: spec.name, Netns: spec.netns, Log: p.layout.Log(spec.name)}
	p.procs[spec.name] = m
	p.mu.Unlock()

	first := make(chan error, 1)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(m.done)
		p.run(ctx, m, first)
	}()
	if err := <-first; err != nil {
		p.stop(spec.name)
		return err
	}
	return nil
}

func (p *procs) run(ctx context.Context, m *managed, first chan<- error) {
	backoff := time.Second
	for {
		started := time.Now()
		cmd, err := p.exec(m)
		if err == nil {
			m.mu.Lock()
			m.proc = cmd.Process
			m.state.PID, m.state.Running, m.state.Started = cmd.Process.Pid, true, started
			m.mu.Unlock()
			p.writePid(m.spec.name, cmd.Process.Pid)
		}
		if first != nil {
			first <- err
			first = nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			m.setExit(err.Error())
		} else {
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			select {
			case err = <-exited:
			case <-ctx.Done():
				terminate(cmd.Process, exited)
				os.Remove(p.pidFile(m.spec.name))
				m.setExit("stopped")
				return
			}
			os.Remove(p.pidFile(m.spec.name))
			m.setExit(exitString(err))
		}
		if !m.spec.restart || ctx.Err() != nil {
			return
		}
		// A process that ran for a while gets restarted fast again.
		if time.Since(started) > 30*time.Second {
			backoff = time.Second
		}
		p.logLine(m.spec.name, fmt.Sprintf("exited (%s), restarting in %s", m.state.LastExit, backoff))
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 30*time.Second)
		m.mu.Lock()
		m.state.Restarts++
		m.mu.Unlock()
	}
}

func (m *managed) setExit(s string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state.Running, m.state.LastExit, m.proc = false, s, nil
}

func exitString(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// terminate sends SIGTERM, then SIGKILL after a grace period.
func terminate(proc *os.Process, exited <-chan error) {
	proc.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		proc.Kill()
		<-exited
	}
}

func (p *procs) exec(m *managed) (*exec.Cmd, error) {
	if err := os.MkdirAll(p.layout.Logs(), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(m.state.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log of %s: %w", m.spec.name, err)
	}
	defer logf.Close()
	cmd := exec.Command(m.spec.argv[0], m.spec.argv[1:]...)
	cmd.Env = append(os.Environ(), m.spec.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group: a terminal's ^C to `lab up` never reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if m.spec.cgroup != "" {
		// Born in its cgroup (clone3 CLONE_INTO_CGROUP), so even its first
		// socket belongs there: cgroup eBPF programs see all of them.
		cg, err := os.Open(m.spec.cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup of %s: %w", m.spec.name, err)
		}
		defer cg.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cg.Fd())
	}
	fmt.Fprintf(logf, "--- %s start %s\n", time.Now().Format(time.RFC3339), m.spec.argv)
	start := cmd.Start
	if m.spec.netns != "" {
		start = func() error { return netns.Do(netns.Path(m.spec.netns), cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", m.spec.name, err)
	}
	return cmd, nil
}

func (p *procs) logLine(name, msg string) {
	f, err := os.OpenFile(p.layout.Log(name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "--- %s supervisor: %s\n", time.Now().Format(time.RFC3339), msg)
}

func (p *procs) pidFile(name string) string {
	return filepath.Join(p.layout.Pids(), name+".pid")
}

func (p *procs) writePid(name string, pid int) {
	os.MkdirAll(p.layout.Pids(), 0o755)
	os.WriteFile(p.pidFile(name), []byte(strconv.Itoa(pid)), 0o644)
}

// stop stops the named process (no restart) and waits for it.
func (p *procs) stop(name string) {
	p.mu.Lock()
	m, ok := p.procs[name]
	delete(p.procs, name)
	p.mu.Unlock()
	if !ok {
		return
	}
	m.cancel()
	<-m.done
}

// stopAll stops every process, in reverse name order within the given
// prefixes first (so pods and agents go before the control plane).
func (p *procs) stopAll(order ...string) {
	for _, prefix := range order {
		var names []string
		p.mu.Lock()
		for n := range p.procs {
			if len(n) >= len(prefix) && n[:len(prefix)] == prefix {
				names = append(names, n)
			}
		}
		p.mu.Unlock()
		var wg sync.WaitGroup
		for _, n := range names {
			wg.Go(func() { p.stop(n) })
		}
		wg.Wait()
	}
	p.mu.Lock()
	rest := make([]string, 0, len(p.procs))
	for n := range p.procs {
		rest = append(rest, n)
	}
	p.mu.Unlock()
	for _, n := range rest {
		p.stop(n)
	}
	p.wg.Wait()
}

func (p *procs) states() []procState {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]procState, 0, len(p.procs))
	for _, m := range p.procs {
		m.mu.Lock()
		out = append(out, m.state)
		m.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// running reports the pid of a running process.
func (p *procs) running(name string) (int, bool) {
	p.mu.Lock()
	m, ok := p.procs[name]
	p.mu.Unlock()
	if !ok {
		return 0, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state.PID, m.state.Running
}

// errExited is returned by waits that saw their process die.
var errExited = errors.New("process exited")
