package lab

import (
	"bufio"
	"encoding/json"
	"os"
	"sync"
	"time"
)

// Event is one line of the supervisor's progress file, which `lab up`
// follows to show what is starting and what is awaited.
type Event struct {
	Time      time.Time `json:"time"`
	Kind      string    `json:"kind"` // "step", "done", "fail" or "ready"
	Msg       string    `json:"msg"`
	Component string    `json:"component,omitempty"`
	Log       string    `json:"log,omitempty"`
}

type progress struct {
	mu   sync.Mutex
	path string
}

func (p *progress) emit(e Event) {
	e.Time = time.Now()
	b, _ := json.Marshal(e)
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := os.OpenFile(p.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	f.Write(append(b, '\n'))
}

func (p *progress) step(msg string) { p.emit(Event{Kind: "step", Msg: msg}) }
func (p *progress) done(msg string) { p.emit(Event{Kind: "done", Msg: msg}) }
func (p *progress) fail(component, log, msg string) {
	p.emit(Event{Kind: "fail", Component: component, Log: log, Msg: msg})
}

// readEvents returns the events after the first skip ones.
func readEvents(path string, skip int) ([]Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Event
	sc := bufio.NewScanner(f)
	for i := 0; sc.Scan(); i++ {
		if i < skip {
			continue
		}
		var e Event
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			out = append(out, e)
		}
	}
	return out, sc.Err()
}
