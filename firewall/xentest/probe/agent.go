package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// store is the part of xenstore the agent uses; tests substitute a fake.
type store interface {
	Read(path string) (string, error)
	Write(path, value string) error
	Directory(path string) ([]string, error)
	Watch(path, token string) (<-chan xenstore.Event, func(), error)
}

var _ store = (*xenstore.Client)(nil)

const (
	// maxDetail bounds a result: xenstore values are meant to be small.
	maxDetail = 512
	// grace is how long a command may overrun its timeout before the
	// agent gives up on it: one that ignores its context must not stall
	// every command after it.
	grace = 2 * time.Second
)

type status string

const (
	statusOK      status = "ok"
	statusFail    status = "fail"    // ran; the answer was wrong or negative
	statusTimeout status = "timeout" // no answer in time
	statusReject  status = "reject"  // refused or unreachable: an ICMP error or RST
	statusError   status = "error"   // bad command or local failure
)

type result struct {
	status status
	detail string
}

func (r result) String() string {
	if d := clip(r.detail, maxDetail); d != "" {
		return string(r.status) + " " + d
	}
	return string(r.status)
}

func errorf(format string, args ...any) result {
	return result{statusError, fmt.Sprintf(format, args...)}
}

// clip makes s one line of at most n bytes: control characters become
// spaces, and a cut does not split a UTF-8 sequence.
func clip(s string, n int) string {
	s = strings.TrimSpace(strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s))
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xc0 == 0x80 { // s[n] continues a sequence
		n--
	}
	return s[:n]
}

// call is one parsed command line.
type call struct {
	name    string
	args    []string          // the fixed arguments
	rest    string            // the free text of sh and udp-send, verbatim
	opts    map[string]string // key=value options other than timeout
	timeout time.Duration
}

// spec describes a command: how many fixed arguments it takes, whether
// free text follows them, its options besides timeout, and its default
// timeout (0: the agent's).
type spec struct {
	args    int
	rest    bool
	opts    []string
	timeout time.Duration
	run     func(ctx context.Context, a *agent, c call) result
}

func builtins() map[string]spec {
	return map[string]spec{
		"sh":          {rest: true, run: runSh},
		"tcp":         {args: 1, timeout: 5 * time.Second, run: runTCP},
		"udp":         {args: 1, timeout: 3 * time.Second, run: runUDP},
		"whoami":      {args: 1, timeout: 5 * time.Second, run: runWhoami},
		"udp-send":    {args: 2, rest: true, run: runUDPSend},
		"hold-start":  {args: 2, timeout: 5 * time.Second, run: runHoldStart},
		"hold-status": {args: 1, run: runHoldStatus},
		"hold-stop":   {args: 1, run: runHoldStatus},
		"dns":         {args: 2, opts: []string{"type"}, timeout: 5 * time.Second, run: runDNS},
		"ping":        {args: 1, opts: []string{"count"}, run: runPing},
	}
}

// parse splits a command line. Words key=value with a key the command
// knows are options; the free text starts at the first other word after
// the fixed arguments (so "sh FOO=1 env" keeps FOO=1 for the shell).
func parse(line string, cmds map[string]spec, defTimeout time.Duration) (spec, call, error) {
	name, s := nextWord(line)
	sp, ok := cmds[name]
	if !ok {
		return sp, call{}, fmt.Errorf("unknown command %q", name)
	}
	c := call{name: name, opts: map[string]string{}, timeout: cmp.Or(sp.timeout, defTimeout)}
	for {
		w, after := nextWord(s)
		if w == "" {
			break
		}
		key, val, isOpt := strings.Cut(w, "=")
		known := isOpt && (key == "timeout" || slices.Contains(sp.opts, key))
		switch {
		case sp.rest && len(c.args) == sp.args && !known:
			c.rest, after = strings.TrimSpace(s), ""
		case key == "timeout" && known:
			d, err := time.ParseDuration(val)
			if err != nil || d <= 0 || d > time.Hour {
				return sp, c, fmt.Errorf("bad timeout %q", val)
			}
			c.timeout = d
		case known:
			c.opts[key] = val
		case isOpt && !sp.rest:
			return sp, c, fmt.Errorf("%s: unknown option %q", name, key)
		case len(c.args) == sp.args:
			return sp, c, fmt.Errorf("%s: too many arguments", name)
		default:
			c.args = append(c.args, w)
		}
		s = after
	}
	if len(c.args) < sp.args || sp.rest && c.rest == "" {
		return sp, c, fmt.Errorf("%s: missing arguments", name)
	}
	return sp, c, nil
}

// nextWord returns the first space-separated word of s and what follows.
func nextWord(s string) (word, rest string) {
	s = strings.TrimLeft(s, " \t")
	if i := strings.IndexAny(s, " \t"); i >= 0 {
		return s[:i], s[i:]
	}
	return s, ""
}

// agent runs the commands dom0 writes below dir.
type agent struct {
	st      store
	dir     string
	out     io.Writer // the VM console
	cmds    map[string]spec
	timeout time.Duration // default bound of a command
	ctx     context.Context

	mu    sync.Mutex
	holds map[string]*hold
}

func newAgent(st store, dir string, out io.Writer) *agent {
	return &agent{st: st, dir: dir, out: out, cmds: builtins(), timeout: 10 * time.Second,
		ctx: context.Background(), holds: map[string]*hold{}}
}

// run announces the agent and serves commands until ctx ends or the
// xenstore connection fails.
func (a *agent) run(ctx context.Context) error {
	a.ctx = ctx
	defer a.stopHolds()
	// Watch before writing ready: dom0 waits for ready, then writes.
	events, cancel, err := a.st.Watch(a.dir+"/cmd", "qgfw-probe")
	if err != nil {
		return err
	}
	defer cancel()
	// A restarted agent must not run a command twice; its results remain.
	names, err := a.st.Directory(a.dir + "/result")
	if err != nil && !errors.Is(err, xenstore.ENOENT) {
		return err
	}
	done := map[string]bool{}
	for _, n := range names {
		done[n] = true
	}
	if err := a.st.Write(a.dir+"/ready", "1"); err != nil {
		return err
	}
	a.logf("ready at %s", a.dir)
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-events:
			if !ok {
				return errors.New("xenstore watch closed")
			}
		}
		// A scan reads the whole directory; queued events would repeat it.
		for len(events) > 0 {
			<-events
		}
		a.scan(done)
	}
}

// scan runs the commands not run yet, one at a time, in numeric order.
func (a *agent) scan(done map[string]bool) {
	names, err := a.st.Directory(a.dir + "/cmd")
	if err != nil {
		if !errors.Is(err, xenstore.ENOENT) {
			a.logf("scan: %v", err)
		}
		return
	}
	var todo []uint64
	for _, name := range names {
		n, err := strconv.ParseUint(name, 10, 32)
		switch {
		case done[name]:
		case err != nil || strconv.FormatUint(n, 10) != name: // "01" would repeat 1
			a.finish(name, done, errorf("bad command number %q", name))
		default:
			todo = append(todo, n)
		}
	}
	slices.Sort(todo)
	for _, n := range todo {
		name := strconv.FormatUint(n, 10)
		line, err := a.st.Read(a.dir + "/cmd/" + name)
		if err != nil {
			a.finish(name, done, errorf("read command: %v", err))
			continue
		}
		a.logf("cmd %s: %s", name, clip(line, maxDetail))
		a.finish(name, done, a.execute(line))
	}
}

func (a *agent) finish(name string, done map[string]bool, r result) {
	done[name] = true
	a.logf("result %s: %s", name, r)
	if err := a.st.Write(a.dir+"/result/"+name, r.String()); err != nil {
		a.logf("write result %s: %v", name, err)
	}
}

// execute runs one command line within its timeout. A panic or an overrun
// becomes a result: the agent outlives every command.
func (a *agent) execute(line string) result {
	sp, c, err := parse(line, a.cmds, a.timeout)
	if err != nil {
		return errorf("%v", err)
	}
	ctx, cancel := context.WithTimeout(a.ctx, c.timeout)
	defer cancel()
	ch := make(chan result, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				ch <- errorf("panic: %v", p)
			}
		}()
		ch <- sp.run(ctx, a, c)
	}()
	select {
	case r := <-ch:
		return r
	case <-time.After(c.timeout + grace):
		return result{statusTimeout, c.name + " overran its deadline"}
	}
}

func (a *agent) logf(format string, args ...any) {
	fmt.Fprintf(a.out, "probe: "+format+"\n", args...)
}
