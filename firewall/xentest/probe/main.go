// Command probe is the test helper of the real-Xen test tier. In a client
// VM it is an agent running the commands dom0 writes to xenstore, so that
// dom0 drives the VMs without using the network under test; in dom0 it
// serves the echo endpoints those commands talk to.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

const usage = `usage: probe agent [-dir DIR] [-xenstore PATH] [-timeout D]
       probe serve [-tcp ADDRS] [-udp ADDRS] [-log FILE]

agent (client VM) writes DIR/ready = 1, then runs each command line dom0
writes to DIR/cmd/<N> (N = 1, 2, ...) once, in increasing order, and writes
"<status> <detail>" (one line, at most 512 bytes) to DIR/result/<N>.
Status: ok, fail, timeout, reject (refused/unreachable), error (bad command
or local failure). key=value options come before any free text; every
command takes timeout=D (default: -timeout, or as shown).
  sh <shell text>                  ok <first line> | fail exit=<n> <output>
  tcp <host:port> [timeout=5s]     "ping" echoed: ok <local> -> <remote>
  udp <host:port> [timeout=3s]     the same over connected UDP (resent each s)
  whoami <host:port> [timeout=5s]  ok <ip:port the server saw>
  udp-send <src-ip[:port]> <ip:port> <text>
                                   one raw datagram, any source (port 40000)
  hold-start <name> <host:port>    ok started; sends "seq <k>" every 200ms
  hold-status <name>               ok echoes=<n> last=<ms> err=<none|text>
  hold-stop <name>                 closes the hold, answers like hold-status
  dns <name> <server[:port]> [type=A|AAAA] [timeout=5s]
                                   ok <addr,...> | fail rcode=<NXDOMAIN...>
  ping <ip> [count=3]              ok|fail <received>/<sent>

serve (dom0) runs TCP line echo and UDP datagram echo on the comma-separated
ADDRS until killed; "whoami" is answered with "you are <ip:port>". Each TCP
connection (open, close) and each datagram is logged as one line, e.g.
  udp 10.138.0.5:40000 -> 10.138.0.1:7 "hello"

Flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one command line and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		args = []string{""}
	}
	switch args[0] {
	case "agent", "serve":
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "probe: unknown command %q\n%s", args[0], usage)
		return 2
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	var err error
	if args[0] == "agent" {
		err = agentMain(ctx, fs, args[1:], stdout)
	} else {
		err = serveMain(ctx, fs, args[1:], stdout, stderr)
	}
	switch {
	case err == nil || errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2 // the flag package has said why
	}
	fmt.Fprintf(stderr, "probe %s: %v\n", args[0], err)
	return 1
}

var errUsage = errors.New("usage error")

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(fs.Output(), "probe %s: unexpected arguments %q\n", fs.Name(), fs.Args())
		return errUsage
	}
	return nil
}

func agentMain(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	dir := fs.String("dir", "data/qgfw-test", "xenstore `DIR`, relative to the domain's home")
	path := fs.String("xenstore", xenstore.DevicePath, "xenstore device or unix socket")
	timeout := fs.Duration("timeout", 10*time.Second, "default bound of a command")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *timeout <= 0 {
		fmt.Fprintln(fs.Output(), "probe agent: -timeout must be positive")
		return errUsage
	}
	// The VM's init may start the agent before the driver creates the
	// device: wait for it a while.
	var c *xenstore.Client
	var err error
	for try := 0; ; try++ {
		if c, err = xenstore.Dial(*path); err == nil || try == 60 || ctx.Err() != nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	a := newAgent(c, strings.TrimRight(*dir, "/"), stdout)
	a.timeout = *timeout
	return a.run(ctx)
}

func serveMain(ctx context.Context, fs *flag.FlagSet, args []string, stdout, stderr io.Writer) error {
	tcp := fs.String("tcp", ":7", "comma-separated TCP listen `ADDRS` (empty: none)")
	udp := fs.String("udp", ":7", "comma-separated IPv4 UDP listen `ADDRS` (empty: none)")
	logPath := fs.String("log", "", "append the log to `FILE` (default: stdout)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	logw := stdout
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		logw = f
	}
	s := &server{log: logw}
	defer s.Close()
	for network, list := range map[string]string{"tcp": *tcp, "udp": *udp} {
		for _, a := range strings.Split(list, ",") {
			if a = strings.TrimSpace(a); a == "" {
				continue
			}
			if _, err := s.Listen(network, a); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(stderr, "probe: serving tcp %q udp %q\n", *tcp, *udp)
	<-ctx.Done()
	return nil
}
