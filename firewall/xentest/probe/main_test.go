package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRunUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		out  string // in stdout, or else stderr
	}{
		{[]string{"-h"}, 0, "usage: probe agent"},
		{[]string{"agent", "-h"}, 0, "-xenstore string"},
		{[]string{"serve", "-h"}, 0, "-log FILE"},
		{nil, 2, `unknown command ""`},
		{[]string{"wait", "x", "1"}, 2, `unknown command "wait"`},
		{[]string{"agent", "-bogus"}, 2, "flag provided but not defined: -bogus"},
		{[]string{"agent", "-timeout", "0s"}, 2, "-timeout must be positive"},
		{[]string{"serve", "extra"}, 2, `unexpected arguments ["extra"]`},
		{[]string{"agent", "-xenstore", "/nonexistent"}, 1, "/nonexistent"},
	} {
		var stdout, stderr bytes.Buffer
		ctx, cancel := context.WithCancel(context.Background())
		if len(tc.args) > 0 && tc.args[len(tc.args)-1] == "/nonexistent" {
			cancel() // do not wait for the device
		}
		code := run(ctx, tc.args, &stdout, &stderr)
		cancel()
		if code != tc.code || !strings.Contains(stdout.String()+stderr.String(), tc.out) {
			t.Errorf("probe %q: exit %d, want %d and %q in\n%s%s", tc.args, code, tc.code, tc.out, stdout.String(), stderr.String())
		}
	}
}

func TestRunServeAppendsToLog(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "serve.log")
	os.WriteFile(logPath, []byte("earlier\n"), 0o644)
	ln, _ := net.Listen("tcp", "127.0.0.1:0") // find a free port
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"serve", "-tcp", addr, "-udp", "", "-log", logPath}, os.Stdout, os.Stderr)
	}()
	var r string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if r = probe("tcp " + addr); strings.HasPrefix(r, "ok ") {
			break
		}
	}
	if !strings.HasPrefix(r, "ok ") {
		t.Fatalf("tcp to probe serve: %q", r)
	}
	time.Sleep(50 * time.Millisecond) // the close line
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("serve exited %d", code)
	}
	b, _ := os.ReadFile(logPath)
	if lines := strings.Split(string(b), "\n"); len(lines) < 3 || lines[0] != "earlier" ||
		!strings.HasSuffix(lines[1], "-> "+addr+" open") || !strings.Contains(lines[2], `close lines=1 first="ping"`) {
		t.Errorf("log:\n%s", b)
	}
}
