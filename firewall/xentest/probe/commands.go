package main

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// classify turns a network error into a result. These errnos are what the
// kernel makes of an ICMP error or a RST, i.e. how a firewall's reject
// shows in the client; stage says what timed out.
func classify(stage string, err error) result {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EACCES,
			unix.EHOSTDOWN, unix.ENONET, unix.ENOPROTOOPT:
			return result{statusReject, unix.ErrnoName(errno)}
		}
	}
	// Deadlines, of the context or the connection, are net.Errors.
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return result{statusTimeout, stage}
	}
	return errorf("%s: %v", stage, err)
}

// dial connects with the command's deadline on the connection too.
func dial(ctx context.Context, network, addr string) (net.Conn, result) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, classify("connect", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	return conn, result{}
}

// tcpLine connects, sends msg and returns the first line of the answer.
func tcpLine(ctx context.Context, addr, msg string) (net.Conn, string, result) {
	conn, r := dial(ctx, "tcp", addr)
	if conn == nil {
		return nil, "", r
	}
	if _, err := io.WriteString(conn, msg+"\n"); err != nil {
		conn.Close()
		return nil, "", classify("send", err)
	}
	line, err := bufio.NewReaderSize(conn, maxDetail).ReadSlice('\n')
	if err != nil {
		conn.Close()
		if len(line) > 0 { // too long, or no newline before EOF
			return nil, "", result{statusFail, fmt.Sprintf("reply %q", clip(string(line), 100))}
		}
		return nil, "", classify("reply", err)
	}
	return conn, strings.TrimSuffix(string(line), "\n"), result{}
}

// udpExchange sends msg on a connected socket, again every second (one
// lost datagram must not fail a test on an emulated, busy host), until
// accept takes a reply or ctx ends.
func udpExchange(ctx context.Context, conn net.Conn, msg []byte, accept func([]byte) bool) ([]byte, result) {
	buf := make([]byte, 2048)
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(time.Minute)
	}
	for {
		if _, err := conn.Write(msg); err != nil {
			return nil, classify("send", err)
		}
		if resend := time.Now().Add(time.Second); resend.Before(dl) {
			conn.SetReadDeadline(resend)
		} else {
			conn.SetReadDeadline(dl)
		}
		for {
			n, err := conn.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil && time.Now().Before(dl) {
				break // send again
			}
			if err != nil {
				return nil, classify("reply", err)
			}
			if accept(buf[:n]) {
				return buf[:n], result{}
			}
		}
	}
}

// echoed checks the reply to "ping".
func echoed(conn net.Conn, reply string) result {
	if reply != "ping" {
		return result{statusFail, fmt.Sprintf("echo %q", clip(reply, 100))}
	}
	return result{statusOK, fmt.Sprintf("%v -> %v", conn.LocalAddr(), conn.RemoteAddr())}
}

func runTCP(ctx context.Context, _ *agent, c call) result {
	conn, line, r := tcpLine(ctx, c.args[0], "ping")
	if conn == nil {
		return r
	}
	defer conn.Close()
	return echoed(conn, line)
}

func runUDP(ctx context.Context, _ *agent, c call) result {
	conn, r := dial(ctx, "udp", c.args[0])
	if conn == nil {
		return r
	}
	defer conn.Close()
	reply, r := udpExchange(ctx, conn, []byte("ping\n"), func([]byte) bool { return true })
	if reply == nil {
		return r
	}
	return echoed(conn, strings.TrimSuffix(string(reply), "\n"))
}

func runWhoami(ctx context.Context, _ *agent, c call) result {
	conn, line, r := tcpLine(ctx, c.args[0], "whoami")
	if conn == nil {
		return r
	}
	conn.Close()
	if seen, ok := strings.CutPrefix(line, "you are "); ok {
		return result{statusOK, seen}
	}
	return result{statusFail, fmt.Sprintf("reply %q", clip(line, 100))}
}

// capture keeps the first max bytes written to it, so that a chatty
// command cannot fill the VM's memory.
type capture struct {
	b   []byte
	max int
}

func (w *capture) Write(p []byte) (int, error) {
	w.b = append(w.b, p[:min(len(p), max(w.max-len(w.b), 0))]...)
	return len(p), nil
}

// runProcess runs a program until it exits or ctx ends. At the deadline
// the whole process group is killed, and Wait gives up on pipes a
// surviving grandchild still holds.
func runProcess(ctx context.Context, name string, args ...string) (out string, exit int, err error) {
	cmd := exec.CommandContext(ctx, name, args...)
	w := &capture{max: 4096}
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ctx.Err() == nil {
		return string(w.b), ee.ExitCode(), nil
	}
	return string(w.b), 0, err
}

func runSh(ctx context.Context, _ *agent, c call) result {
	out, exit, err := runProcess(ctx, "/bin/sh", "-c", c.rest)
	switch {
	case ctx.Err() != nil:
		return result{statusTimeout, clip(out, 200)}
	case err != nil:
		return errorf("sh: %v", err)
	case exit != 0:
		return result{statusFail, fmt.Sprintf("exit=%d %s", exit, clip(out, 200))}
	}
	first, _, _ := strings.Cut(out, "\n")
	return result{statusOK, first}
}

// pingSummary matches busybox ("3 packets transmitted, 3 packets received")
// and iputils ("3 packets transmitted, 3 received").
var pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (?:packets )?received`)

// runPing is ok when any reply came back: the test asks "does ICMP pass".
func runPing(ctx context.Context, _ *agent, c call) result {
	count, err := strconv.Atoi(cmp.Or(c.opts["count"], "3"))
	if err != nil || count < 1 || count > 100 {
		return errorf("bad count %q", c.opts["count"])
	}
	out, exit, err := runProcess(ctx, "ping", "-c", strconv.Itoa(count), "-W", "2", c.args[0])
	m := pingSummary.FindStringSubmatch(out)
	switch {
	case m != nil && m[2] != "0":
		return result{statusOK, m[2] + "/" + m[1]}
	case m != nil:
		return result{statusFail, m[2] + "/" + m[1]}
	case ctx.Err() != nil:
		return result{statusTimeout, clip(out, 200)}
	case err != nil:
		return errorf("ping: %v", err)
	}
	return errorf("ping: exit=%d %s", exit, clip(out, 200))
}
