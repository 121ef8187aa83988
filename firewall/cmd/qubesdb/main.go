// Command qubesdb serves a QubesDB over unix sockets and talks to one, for
// tests and for driving a firewall by hand:
//
//	qubesdb serve -socket /tmp/qdb.sock -peer-socket /tmp/qdb-peer.sock -init rules.txt
//	qubesdb write -socket /tmp/qdb.sock /qubes-firewall/10.137.0.5 ''
//
// A write to the daemon socket is pushed to the firewall connected to the
// peer socket, as dom0 would push it over vchan.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"syscall"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
)

const usage = `usage: qubesdb COMMAND [flags] [args]

Commands (flags go before the arguments):
  serve [-socket PATH] [-peer-socket PATH] [-init FILE]
        serve a database: daemon mode on -socket, dom0 (peer) mode on
        -peer-socket; FILE holds lines "PATH VALUE" (VALUE is the rest of
        the line, may be empty; blank lines and lines starting with # are
        skipped)
  read [-socket PATH] PATH            print the value at PATH
  write [-socket PATH] PATH VALUE     set PATH to VALUE
  rm [-socket PATH] PATH              remove PATH (a subtree if it ends with /)
  list [-socket PATH] PREFIX          print the paths starting with PREFIX
  multiread [-socket PATH] PREFIX     print "PATH VALUE" for entries under PREFIX
  watch [-socket PATH] [-n COUNT] PATH
        print the path of every change under PATH (PATH ending with / watches
        the subtree); stop after COUNT events if COUNT > 0

Flags:
  -socket PATH       daemon socket (default ` + qubesdb.DefaultSocket + `)
  -peer-socket PATH  serve: also accept one peer (dom0 mode) at a time here
  -init FILE         serve: preload the database from FILE
  -n COUNT           watch: exit after COUNT events (0: run until killed)
`

// errUsage makes run exit with status 2.
var errUsage = errors.New("usage error")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one command line and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	err := dispatch(ctx, args, stdout, stderr)
	switch {
	case err == nil || errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "qubesdb: %v\n%s", err, usage)
		return 2
	}
	fmt.Fprintf(stderr, "qubesdb: %v\n", err)
	return 1
}

// command is a subcommand's parsed flags and arguments.
type command struct {
	socket, peerSocket, initFile string
	count                        int
	args                         []string
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || slices.Contains([]string{"-h", "-help", "--help", "help"}, args[0]) {
		if len(args) == 0 {
			return fmt.Errorf("%w: no command", errUsage)
		}
		fmt.Fprint(stdout, usage)
		return nil
	}
	name := args[0]
	nargs := map[string]int{"serve": 0, "read": 1, "write": 2, "rm": 1, "list": 1, "multiread": 1, "watch": 1}
	want, ok := nargs[name]
	if !ok {
		return fmt.Errorf("%w: unknown command %q", errUsage, name)
	}
	var cmd command
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	fs.StringVar(&cmd.socket, "socket", qubesdb.DefaultSocket, "daemon socket")
	switch name {
	case "serve":
		fs.StringVar(&cmd.peerSocket, "peer-socket", "", "also serve one peer (dom0 mode) here")
		fs.StringVar(&cmd.initFile, "init", "", "preload the database from `FILE`")
	case "watch":
		fs.IntVar(&cmd.count, "n", 0, "exit after `COUNT` events (0: never)")
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %s: %v", errUsage, name, err)
	}
	cmd.args = fs.Args()
	if len(cmd.args) != want {
		return fmt.Errorf("%w: %s takes %d argument(s), got %d", errUsage, name, want, len(cmd.args))
	}
	if name == "serve" {
		return serve(ctx, cmd, stderr)
	}
	return client(ctx, name, cmd, stdout, stderr)
}

// client runs one daemon-mode request.
func client(ctx context.Context, name string, cmd command, stdout, stderr io.Writer) error {
	rwc, err := qubesdb.UnixDialer(cmd.socket)(ctx)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", cmd.socket, err)
	}
	conn := qubesdb.NewConn(rwc)
	defer conn.Close()
	// A blocked request (watch, above all) ends with the context.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	a := cmd.args
	switch name {
	case "read":
		v, err := conn.Read(a[0])
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, v)
	case "write":
		return conn.Write(a[0], a[1])
	case "rm":
		return conn.Rm(a[0])
	case "list":
		paths, err := conn.List(a[0])
		if err != nil {
			return err
		}
		for _, p := range paths {
			fmt.Fprintln(stdout, p)
		}
	case "multiread":
		entries, err := conn.MultiRead(a[0])
		if err != nil {
			return err
		}
		for _, p := range slices.Sorted(maps.Keys(entries)) {
			fmt.Fprintf(stdout, "%s %s\n", p, entries[p])
		}
	case "watch":
		if err := conn.Watch(a[0]); err != nil {
			return err
		}
		// Tells a waiting script (or test) that no change can be missed now.
		fmt.Fprintf(stderr, "qubesdb: watching %s\n", a[0])
		for n := 0; cmd.count <= 0 || n < cmd.count; n++ {
			p, err := conn.NextWatch()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			fmt.Fprintln(stdout, p)
		}
	}
	return nil
}
