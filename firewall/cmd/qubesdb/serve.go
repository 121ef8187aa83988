package main

import (
	"bufio"
	"context"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb/qubesdbtest"
	"io"
	"net"
	"os"
	"strings"
)

// serve runs a server until ctx is done.
func serve(ctx context.Context, cmd command, stderr io.Writer) error {
	logf := func(format string, args ...any) { fmt.Fprintf(stderr, format+"\n", args...) }
	srv := qubesdbtest.NewServer(logf)
	if cmd.initFile != "" {
		if err := preload(srv, cmd.initFile); err != nil {
			return err
		}
	}
	l, err := listen(cmd.socket)
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(l) }()
	running := 1
	if cmd.peerSocket != "" {
		pl, err := listen(cmd.peerSocket)
		if err != nil {
			srv.Close()
			<-errc
			return err
		}
		go func() { errc <- srv.ServePeerListener(pl) }()
		running++
		logf("qubesdb: serving peer on %s", cmd.peerSocket)
	}
	logf("qubesdb: serving on %s", cmd.socket)
	select {
	case <-ctx.Done():
	case err = <-errc:
		running--
	}
	srv.Close()
	for ; running > 0; running-- {
		if e := <-errc; err == nil {
			err = e
		}
	}
	return err
}

// listen creates a unix socket at path, replacing a stale socket left by an
// earlier run (but never another kind of file).
func listen(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	// Remove the socket file when the listener closes.
	l.(*net.UnixListener).SetUnlinkOnClose(true)
	return l, nil
}

// preload writes the entries of an init file: "PATH VALUE" per line.
func preload(srv *qubesdbtest.Server, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			continue
		}
		path, value, _ := strings.Cut(line, " ")
		if err := srv.Write(path, value); err != nil {
			return fmt.Errorf("init %s:%d: %w", file, n, err)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("init %s: %w", file, err)
	}
	return nil
}
