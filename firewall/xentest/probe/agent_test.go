package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

const dir = "data/qgfw-test"

// syncBuffer is a console the agent and the test may use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testAgent is an agent on a fake store with two extra commands: "rec X"
// records X and answers "ok X"; "block" ignores its context for a minute.
type testAgent struct {
	*agent
	st      *fakeStore
	console *syncBuffer
	mu      sync.Mutex
	ran     []string
	errc    chan error
	cancel  context.CancelFunc
}

func startAgent(t *testing.T, preload map[string]string) *testAgent {
	t.Helper()
	ta := &testAgent{st: newFakeStore(), console: &syncBuffer{}, errc: make(chan error, 1)}
	for p, v := range preload {
		ta.st.Write(p, v)
	}
	ta.agent = newAgent(ta.st, dir, ta.console)
	ta.cmds["rec"] = spec{args: 1, run: func(_ context.Context, _ *agent, c call) result {
		ta.mu.Lock()
		defer ta.mu.Unlock()
		ta.ran = append(ta.ran, c.args[0])
		return result{statusOK, c.args[0]}
	}}
	ta.cmds["block"] = spec{run: func(context.Context, *agent, call) result {
		time.Sleep(time.Minute)
		return result{statusOK, "woke"}
	}}
	ta.cmds["panic"] = spec{run: func(context.Context, *agent, call) result { panic("boom") }}
	var ctx context.Context
	ctx, ta.cancel = context.WithCancel(context.Background())
	go func() { ta.errc <- ta.run(ctx) }()
	t.Cleanup(func() {
		ta.cancel()
		<-ta.errc
	})
	if v := ta.st.wait(t, dir+"/ready", 2*time.Second); v != "1" {
		t.Fatalf("ready = %q, want 1", v)
	}
	return ta
}

// do writes command n and returns its result.
func (ta *testAgent) do(t *testing.T, n, line string) string {
	t.Helper()
	ta.st.Write(dir+"/cmd/"+n, line)
	return ta.st.wait(t, dir+"/result/"+n, 20*time.Second)
}

func TestAgentRunsEachCommandOnceInNumericOrder(t *testing.T) {
	// Written before the agent starts, and "10" sorts before "2" as text.
	ta := startAgent(t, map[string]string{
		dir + "/cmd/2": "rec two", dir + "/cmd/10": "rec ten", dir + "/cmd/1": "rec one", dir + "/cmd/3": "rec three",
	})
	ta.st.wait(t, dir+"/result/10", 2*time.Second)
	if got := ta.do(t, "11", "rec eleven"); got != "ok eleven" {
		t.Errorf("result/11 = %q", got)
	}
	ta.st.Write(dir+"/cmd/1", "rec again") // rewriting a command does not re-run it
	ta.do(t, "12", "rec twelve")
	ta.mu.Lock()
	got := strings.Join(ta.ran, " ")
	ta.mu.Unlock()
	if want := "one two three ten eleven twelve"; got != want {
		t.Errorf("ran %q, want %q", got, want)
	}
	for n, want := range map[string]string{"1": "ok one", "2": "ok two", "10": "ok ten"} {
		if v, _ := ta.st.Read(dir + "/result/" + n); v != want {
			t.Errorf("result/%s = %q, want %q", n, v, want)
		}
	}
	for _, want := range []string{"probe: ready at " + dir, "probe: cmd 10: rec ten\n", "probe: result 10: ok ten\n"} {
		if !strings.Contains(ta.console.String(), want) {
			t.Errorf("console lacks %q:\n%s", want, ta.console.String())
		}
	}
}

func TestAgentSkipsCommandsWithResults(t *testing.T) {
	ta := startAgent(t, map[string]string{
		dir + "/cmd/1": "rec old", dir + "/result/1": "ok old",
	})
	ta.do(t, "2", "rec new")
	ta.mu.Lock()
	defer ta.mu.Unlock()
	if len(ta.ran) != 1 || ta.ran[0] != "new" {
		t.Errorf("ran %q, want only the new command", ta.ran)
	}
}

func TestAgentSurvivesBadCommands(t *testing.T) {
	ta := startAgent(t, nil)
	for i, tc := range []struct{ line, want string }{
		{"frobnicate now", `error unknown command "frobnicate"`},
		{"", `error unknown command ""`},
		{"tcp", "error tcp: missing arguments"},
		{"tcp 127.0.0.1:7 127.0.0.1:8", "error tcp: too many arguments"},
		{"tcp 127.0.0.1:7 colour=red", `error tcp: unknown option "colour"`},
		{"sh timeout=forever true", `error bad timeout "forever"`},
		{"panic", "error panic: boom"},
		{"hold-status nope", "error no such hold"},
		{"rec fine", "ok fine"},
	} {
		n := string(rune('1' + i))
		if got := ta.do(t, n, tc.line); got != tc.want {
			t.Errorf("%q: result %q, want %q", tc.line, got, tc.want)
		}
	}
	ta.st.Write(dir+"/cmd/010", "rec zero-ten")
	if got := ta.st.wait(t, dir+"/result/010", 2*time.Second); got != `error bad command number "010"` {
		t.Errorf("result/010 = %q", got)
	}
}

func TestAgentBoundsSlowCommands(t *testing.T) {
	ta := startAgent(t, nil)
	start := time.Now()
	if got := ta.do(t, "1", "sh timeout=300ms echo started; sleep 30"); got != "timeout started" {
		t.Errorf("sh result %q, want timeout", got)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("sh took %v despite timeout=300ms", d)
	}
	// A command that ignores its context is given up on after grace.
	start = time.Now()
	if got := ta.do(t, "2", "block timeout=100ms"); got != "timeout block overran its deadline" {
		t.Errorf("block result %q", got)
	}
	if d := time.Since(start); d > 100*time.Millisecond+grace+time.Second {
		t.Errorf("block took %v", d)
	}
	if got := ta.do(t, "3", "rec after"); got != "ok after" {
		t.Errorf("after a timeout: %q", got)
	}
}

func TestAgentHoldStartReturnsAtOnce(t *testing.T) {
	srv := startServer(t)
	ta := startAgent(t, nil)
	start := time.Now()
	if got := ta.do(t, "1", "hold-start h1 "+srv.tcp); got != "ok started" {
		t.Fatalf("hold-start: %q", got)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("hold-start took %v", d)
	}
	if got := ta.do(t, "2", "hold-start h1 "+srv.tcp); got != `error hold "h1" exists` {
		t.Errorf("second hold-start: %q", got)
	}
	time.Sleep(5 * holdInterval)
	r := ta.do(t, "3", "hold-status h1")
	var echoes, last int
	var e string
	if _, err := fmt.Sscanf(r, "ok echoes=%d last=%d err=%s", &echoes, &last, &e); err != nil || echoes < 2 || last > 1000 || e != "none" {
		t.Errorf("hold-status %q: want a few echoes, recent, no error (%v)", r, err)
	}
	if r := ta.do(t, "4", "hold-stop h1"); !strings.HasPrefix(r, "ok echoes=") {
		t.Errorf("hold-stop: %q", r)
	}
	if r := ta.do(t, "5", "hold-status h1"); r != "error no such hold" {
		t.Errorf("hold-status after stop: %q", r)
	}
}

func TestAgentEndsWhenXenstoreFails(t *testing.T) {
	ta := startAgent(t, nil)
	ta.st.Close()
	select {
	case err := <-ta.errc:
		if err == nil {
			t.Error("run returned nil after the watch closed")
		}
		ta.errc <- err // for the cleanup
	case <-time.After(2 * time.Second):
		t.Fatal("run did not return after the watch closed")
	}
}

func TestParse(t *testing.T) {
	cmds := builtins()
	for _, tc := range []struct {
		line    string
		args    []string
		rest    string
		opts    map[string]string
		timeout time.Duration
	}{
		{"tcp 10.0.0.1:7", []string{"10.0.0.1:7"}, "", nil, 5 * time.Second},
		{"tcp 10.0.0.1:7 timeout=2s", []string{"10.0.0.1:7"}, "", nil, 2 * time.Second},
		{"  tcp\ttimeout=2s  10.0.0.1:7 ", []string{"10.0.0.1:7"}, "", nil, 2 * time.Second},
		{"sh echo a  b | tr a c", nil, "echo a  b | tr a c", nil, 10 * time.Second},
		{"sh timeout=1s FOO=1 env timeout=3", nil, "FOO=1 env timeout=3", nil, time.Second},
		{"udp-send 10.0.0.9 10.0.0.1:7 hello  world", []string{"10.0.0.9", "10.0.0.1:7"}, "hello  world", nil, 10 * time.Second},
		{"dns fw.test 10.0.0.1 type=AAAA", []string{"fw.test", "10.0.0.1"}, "", map[string]string{"type": "AAAA"}, 5 * time.Second},
		{"ping 10.0.0.1 count=1 timeout=4s", []string{"10.0.0.1"}, "", map[string]string{"count": "1"}, 4 * time.Second},
	} {
		_, c, err := parse(tc.line, cmds, 10*time.Second)
		if err != nil {
			t.Errorf("%q: %v", tc.line, err)
			continue
		}
		if strings.Join(c.args, "|") != strings.Join(tc.args, "|") || c.rest != tc.rest || c.timeout != tc.timeout || len(c.opts) != len(tc.opts) {
			t.Errorf("%q: args %q rest %q opts %v timeout %v", tc.line, c.args, c.rest, c.opts, c.timeout)
		}
		for k, v := range tc.opts {
			if c.opts[k] != v {
				t.Errorf("%q: option %s = %q, want %q", tc.line, k, c.opts[k], v)
			}
		}
	}
	for _, bad := range []string{"sh", "sh timeout=1s", "udp-send 10.0.0.9 10.0.0.1:7", "dns fw.test", "ping 1.2.3.4 size=9"} {
		if _, _, err := parse(bad, cmds, time.Second); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestClip(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"one\ntwo\r\n", 512, "one two"},
		{"tab\there\x00", 512, "tab here"},
		{"abcdef", 3, "abc"},
		{"aé", 2, "a"}, // é is two bytes: not cut in half
		{strings.Repeat("x", 600), maxDetail, strings.Repeat("x", maxDetail)},
	} {
		if got := clip(tc.in, tc.n); got != tc.want {
			t.Errorf("clip(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
	if r := (result{statusFail, strings.Repeat("y\n", 400)}); len(r.String()) != len("fail ")+maxDetail {
		t.Errorf("result line of %d bytes", len(r.String()))
	}
}
