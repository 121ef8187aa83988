package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
)

const guard = 20 * time.Second

// lineWriter collects output and signals each line that contains a marker.
type lineWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	marker string
	seen   chan struct{}
}

func newLineWriter(marker string) *lineWriter {
	return &lineWriter{marker: marker, seen: make(chan struct{}, 10)}
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if bytes.Contains(b, []byte(w.marker)) {
		w.seen <- struct{}{}
	}
	return w.buf.Write(b)
}

func (w *lineWriter) wait(t *testing.T) {
	t.Helper()
	select {
	case <-w.seen:
	case <-time.After(guard):
		t.Fatalf("never saw %q", w.marker)
	}
}

// cli runs one command line in-process.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), args, &o, &e)
	return code, o.String(), e.String()
}

// startServe runs "qubesdb serve" in-process until the test ends.
func startServe(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stderr := newLineWriter("serving on")
	done := make(chan int, 1)
	go func() { done <- run(ctx, append([]string{"serve"}, args...), os.Stdout, stderr) }()
	stderr.wait(t)
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("serve exited %d: %s", code, stderr.buf.String())
		}
	})
}

func TestCommands(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "qdb.sock")
	peerSock := filepath.Join(dir, "peer.sock")
	init := filepath.Join(dir, "init")
	os.WriteFile(init, []byte("# preload\n/qubes-ip 10.137.0.1\n\n"+
		"/qubes-firewall/10.137.0.5/0000 action=accept proto=tcp dstports=443-443\n"+
		"/qubes-firewall/10.137.0.5\n"), 0o644)
	startServe(t, "-socket", sock, "-peer-socket", peerSock, "-init", init)

	// A firewall connected as peer sees CLI writes pushed to it.
	events := make(chan qubesdb.Event, 10)
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() {
		stopped <- qubesdb.NewClient(qubesdb.UnixDialer(peerSock), qubesdb.Peer, t.Logf).Run(ctx,
			qubesdb.NewMirror(func(e qubesdb.Event) { events <- e }))
	}()
	defer func() {
		cancel()
		<-stopped
	}()
	next := func() qubesdb.Event {
		t.Helper()
		select {
		case e := <-events:
			return e
		case <-time.After(guard):
			t.Fatal("no event")
			return qubesdb.Event{}
		}
	}
	if e := next(); e.Kind != qubesdb.EventSnapshot || e.Uplink.IP != "10.137.0.1" ||
		e.AllRules["10.137.0.5"]["0000"] != "action=accept proto=tcp dstports=443-443" {
		t.Fatalf("snapshot %+v", e)
	}

	for _, tc := range []struct {
		args   []string
		code   int
		stdout string
	}{
		{[]string{"read", "/qubes-ip"}, 0, "10.137.0.1\n"},
		{[]string{"write", "/qubes-firewall/10.137.0.5/policy", "drop"}, 0, ""},
		{[]string{"write", "/qubes-firewall/10.137.0.5", ""}, 0, ""},
		{[]string{"list", "/qubes-firewall/"}, 0, "/qubes-firewall/10.137.0.5\n/qubes-firewall/10.137.0.5/0000\n/qubes-firewall/10.137.0.5/policy\n"},
		{[]string{"multiread", "/qubes-firewall/10.137.0.5/"}, 0,
			"/qubes-firewall/10.137.0.5/0000 action=accept proto=tcp dstports=443-443\n/qubes-firewall/10.137.0.5/policy drop\n"},
		{[]string{"rm", "/qubes-firewall/10.137.0.5/"}, 0, ""},
		{[]string{"rm", "/qubes-firewall/10.137.0.5/"}, 1, ""},
		{[]string{"read", "/qubes-firewall/10.137.0.5/policy"}, 1, ""},
	} {
		code, out, errOut := cli(t, append(tc.args[:1:1], append([]string{"-socket", sock}, tc.args[1:]...)...)...)
		if code != tc.code || out != tc.stdout {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want %d, %q", tc.args, code, out, errOut, tc.code, tc.stdout)
		}
		if code == 1 && !strings.Contains(errOut, "no such entry") {
			t.Errorf("%q: stderr %q", tc.args, errOut)
		}
	}
	e := next()
	if e.Kind != qubesdb.EventRules || e.Rules["policy"] != "drop" || len(e.Rules) != 2 {
		t.Fatalf("rules event %+v", e)
	}

	// watch: ready once "watching" is printed, then reports the change.
	stderr := newLineWriter("watching")
	var out bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(context.Background(), []string{"watch", "-socket", sock, "-n", "1", "/qubes-"}, &out, stderr)
	}()
	stderr.wait(t)
	// "/qubes-" without trailing slash watches that exact path only.
	if code, _, errOut := cli(t, "write", "-socket", sock, "/qubes-", "x"); code != 0 {
		t.Fatal(errOut)
	}
	if code := <-done; code != 0 || out.String() != "/qubes-\n" {
		t.Fatalf("watch exit %d, stdout %q", code, out.String())
	}
}

func TestUsage(t *testing.T) {
	code, out, _ := cli(t, "-h")
	if code != 0 {
		t.Fatalf("-h exit %d", code)
	}
	for _, w := range []string{"serve", "read", "write", "rm", "list", "multiread", "watch",
		"-socket", "-peer-socket", "-init", "-n", qubesdb.DefaultSocket} {
		if !strings.Contains(out, w) {
			t.Errorf("usage lacks %q", w)
		}
	}
	for _, args := range [][]string{{}, {"frobnicate"}, {"read"}, {"write", "/a"}, {"read", "-bogus", "/a"}} {
		if code, _, errOut := cli(t, args...); code != 2 || !strings.Contains(errOut, "usage") {
			t.Errorf("%q: exit %d, stderr %q; want 2 with usage", args, code, errOut)
		}
	}
	dir := t.TempDir()
	if code, _, errOut := cli(t, "read", "-socket", filepath.Join(dir, "none"), "/a"); code != 1 || !strings.Contains(errOut, "connect to") {
		t.Errorf("no server: exit %d, stderr %q", code, errOut)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("/ok 1\nnot-a-path 2\n"), 0o644)
	if code, _, errOut := cli(t, "serve", "-socket", filepath.Join(dir, "s"), "-init", bad); code != 1 || !strings.Contains(errOut, "bad:2") {
		t.Errorf("bad init file: exit %d, stderr %q", code, errOut)
	}
}
