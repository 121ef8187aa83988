package main

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

type testServer struct {
	tcp, udp string
	log      *syncBuffer
}

// startServer runs probe serve's servers on loopback ports.
func startServer(t *testing.T) *testServer {
	t.Helper()
	ts := &testServer{log: &syncBuffer{}}
	s := &server{log: ts.log}
	t.Cleanup(s.Close)
	for _, p := range []struct {
		network string
		addr    *string
	}{{"tcp", &ts.tcp}, {"udp", &ts.udp}} {
		a, err := s.Listen(p.network, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		*p.addr = a.String()
	}
	return ts
}

// waitLog waits for a log line matching the regular expression re.
func (ts *testServer) waitLog(t *testing.T, re string) {
	t.Helper()
	rx := regexp.MustCompile("(?m)" + re)
	for deadline := time.Now().Add(2 * time.Second); !rx.MatchString(ts.log.String()); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no log line matching %s in:\n%s", re, ts.log.String())
		}
	}
}

func probe(line string) string { return newAgent(nil, dir, io.Discard).execute(line).String() }

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T, network string) string {
	t.Helper()
	var c io.Closer
	var addr string
	if network == "udp" {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, addr = pc, pc.LocalAddr().String()
	} else {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, addr = ln, ln.Addr().String()
	}
	c.Close()
	return addr
}

func TestTCPEcho(t *testing.T) {
	ts := startServer(t)
	r := probe("tcp " + ts.tcp)
	m := regexp.MustCompile(`^ok (127\.0\.0\.1:\d+) -> ` + regexp.QuoteMeta(ts.tcp) + `$`).FindStringSubmatch(r)
	if m == nil {
		t.Fatalf("tcp: %q", r)
	}
	ts.waitLog(t, `^tcp `+regexp.QuoteMeta(m[1]+" -> "+ts.tcp)+` open$`)
	ts.waitLog(t, `^tcp `+regexp.QuoteMeta(m[1]+" -> "+ts.tcp)+` close lines=1 first="ping" err=none$`)
}

func TestUDPEcho(t *testing.T) {
	ts := startServer(t)
	r := probe("udp " + ts.udp)
	m := regexp.MustCompile(`^ok (127\.0\.0\.1:\d+) -> ` + regexp.QuoteMeta(ts.udp) + `$`).FindStringSubmatch(r)
	if m == nil {
		t.Fatalf("udp: %q", r)
	}
	ts.waitLog(t, `^udp `+regexp.QuoteMeta(m[1]+" -> "+ts.udp)+` "ping"$`)
}

func TestWhoami(t *testing.T) {
	ts := startServer(t)
	r := probe("whoami " + ts.tcp)
	seen, ok := strings.CutPrefix(r, "ok ")
	if !ok || !strings.HasPrefix(seen, "127.0.0.1:") {
		t.Fatalf("whoami: %q", r)
	}
	ts.waitLog(t, `^tcp `+regexp.QuoteMeta(seen+" -> "+ts.tcp)+` close lines=1 first="whoami"`)

	// Over UDP the server answers with the datagram's source.
	c, err := net.Dial("udp", ts.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	c.Write([]byte("whoami\n"))
	buf := make([]byte, 100)
	n, err := c.Read(buf)
	if want := "you are " + c.LocalAddr().String() + "\n"; err != nil || string(buf[:n]) != want {
		t.Errorf("udp whoami: %q, %v; want %q", buf[:n], err, want)
	}
}

// On a wildcard address, replies must come from the address the client
// sent to (any of 127/8 here), or its connected socket drops them.
func TestServeWildcardAnswersFromDestination(t *testing.T) {
	log := &syncBuffer{}
	s := &server{log: log}
	defer s.Close()
	ua, err := s.Listen("udp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	to := "127.0.0.2:" + strings.TrimPrefix(ua.String(), "0.0.0.0:")
	r := probe("udp " + to)
	if !strings.HasSuffix(r, " -> "+to) || !strings.HasPrefix(r, "ok ") {
		t.Fatalf("udp %s: %q", to, r)
	}
	ts := &testServer{log: log}
	ts.waitLog(t, `^udp 127\.0\.0\.\d+:\d+ -> `+regexp.QuoteMeta(to)+` "ping"$`)
}

func TestRejectsAClosedPort(t *testing.T) {
	for _, network := range []string{"tcp", "udp"} {
		if r := probe(network + " " + closedPort(t, network)); r != "reject ECONNREFUSED" {
			t.Errorf("%s to a closed port: %q", network, r)
		}
	}
}

// silent returns TCP and UDP addresses that take packets and never answer.
func silent(t *testing.T) (tcp, udp string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close(); pc.Close() })
	return ln.Addr().String(), pc.LocalAddr().String()
}

func TestTimeouts(t *testing.T) {
	tcp, udp := silent(t)
	for _, tc := range []struct{ line, want string }{
		{"tcp " + tcp + " timeout=200ms", "timeout reply"},
		{"whoami " + tcp + " timeout=200ms", "timeout reply"},
		{"udp " + udp + " timeout=1500ms", "timeout reply"}, // sent twice
		{"dns fw.test " + udp + " timeout=300ms", "timeout reply"},
	} {
		start := time.Now()
		if r := probe(tc.line); r != tc.want {
			t.Errorf("%s: %q, want %q", tc.line, r, tc.want)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s took %v", tc.line, d)
		}
	}
}

func TestHoldReportsAPeerThatHangsUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			buf := make([]byte, 100)
			n, _ := c.Read(buf)
			c.Write(buf[:n]) // one echo, then hang up
			c.Close()
		}
	}()
	a := newAgent(nil, dir, io.Discard)
	defer a.stopHolds()
	if r := a.execute("hold-start h " + ln.Addr().String()).String(); r != "ok started" {
		t.Fatalf("hold-start: %q", r)
	}
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r := a.execute("hold-status h").String()
		if strings.Contains(r, "err=receive: closed by peer") || strings.Contains(r, "err=send") {
			if !strings.HasPrefix(r, "ok echoes=1 ") {
				t.Errorf("hold-status %q: want the one echo counted", r)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hold-status %q: no error after the peer hung up", r)
		}
	}
}

// dnsResponder answers A queries for fw.test. with two addresses and
// everything else with NXDOMAIN. It drops the first query it sees and
// sends a reply with a wrong ID before each real one, which the client
// must resend past and ignore.
func dnsResponder(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for seen := 0; ; seen++ {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var q dnsmessage.Message
			if q.Unpack(buf[:n]) != nil || len(q.Questions) != 1 || seen == 0 {
				continue
			}
			resp := dnsmessage.Message{Header: dnsmessage.Header{ID: q.ID + 1, Response: true}, Questions: q.Questions}
			stale, _ := resp.Pack()
			pc.WriteTo(stale, from)
			resp.ID = q.ID
			switch qu := q.Questions[0]; {
			case qu.Name.String() != "fw.test.":
				resp.RCode = dnsmessage.RCodeNameError
			case qu.Type == dnsmessage.TypeA:
				h := dnsmessage.ResourceHeader{Name: qu.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60}
				// A CNAME first: answers of other types are skipped.
				cname := dnsmessage.MustNewName("alias.test.")
				resp.Answers = []dnsmessage.Resource{
					{Header: dnsmessage.ResourceHeader{Name: qu.Name, Type: dnsmessage.TypeCNAME, Class: dnsmessage.ClassINET}, Body: &dnsmessage.CNAMEResource{CNAME: cname}},
					{Header: h, Body: &dnsmessage.AResource{A: [4]byte{10, 139, 1, 1}}},
					{Header: h, Body: &dnsmessage.AResource{A: [4]byte{10, 139, 1, 2}}},
				}
			}
			b, _ := resp.Pack()
			pc.WriteTo(b, from)
		}
	}()
	return pc.LocalAddr().String()
}

func TestDNS(t *testing.T) {
	srv := dnsResponder(t)
	for _, tc := range []struct{ line, want string }{
		{"dns fw.test " + srv, "ok 10.139.1.1,10.139.1.2"}, // after one resend
		{"dns fw.test. " + srv + " type=A", "ok 10.139.1.1,10.139.1.2"},
		{"dns fw.test " + srv + " type=AAAA", "ok"},
		{"dns nosuch.test " + srv, "fail rcode=NXDOMAIN"},
		{"dns fw.test " + closedPort(t, "udp"), "reject ECONNREFUSED"},
		{"dns fw.test 127.0.0.1:53 type=MX", `error unsupported type "MX"`},
		{"dns fw.test not-an-ip", `error bad server "not-an-ip"`},
	} {
		if r := probe(tc.line); r != tc.want {
			t.Errorf("%s: %q, want %q", tc.line, r, tc.want)
		}
	}
}

func TestSh(t *testing.T) {
	for _, tc := range []struct{ line, want string }{
		{"sh echo hello; echo world", "ok hello"},
		{"sh true", "ok"},
		{"sh echo oops >&2; exit 3", "fail exit=3 oops"},
		{"sh FOO='a  b' sh -c 'echo \"$FOO\"'", "ok a  b"},
	} {
		if r := probe(tc.line); r != tc.want {
			t.Errorf("%s: %q, want %q", tc.line, r, tc.want)
		}
	}
}

// TestPing runs runPing against stand-ins printing busybox's and iputils'
// summaries, found first on PATH.
func TestPing(t *testing.T) {
	bin := t.TempDir()
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	script := `#!/bin/sh
case "$*" in
"-c 3 -W 2 10.0.0.1") echo "3 packets transmitted, 3 packets received, 0% packet loss" ;;
"-c 2 -W 2 10.0.0.2") echo "2 packets transmitted, 0 received, 100% packet loss"; exit 1 ;;
"-c 5 -W 2 10.0.0.3") echo "5 packets transmitted, 4 received, 20% packet loss" ;;
*) echo "ping: bad address '$*'"; exit 1 ;;
esac
`
	if err := os.WriteFile(filepath.Join(bin, "ping"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ line, want string }{
		{"ping 10.0.0.1", "ok 3/3"},
		{"ping 10.0.0.2 count=2", "fail 0/2"},
		{"ping 10.0.0.3 count=5", "ok 4/5"},
		{"ping nowhere", "error ping: exit=1 ping: bad address '-c 3 -W 2 nowhere'"},
		{"ping 10.0.0.1 count=0", `error bad count "0"`},
	} {
		if r := probe(tc.line); r != tc.want {
			t.Errorf("%s: %q, want %q", tc.line, r, tc.want)
		}
	}
}

// TestUDPSendSpoofed sends a datagram from an address the host does not
// use through the raw socket, and checks probe serve logged it. It needs
// CAP_NET_RAW.
func TestUDPSendSpoofed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a raw socket")
	}
	ts := startServer(t)
	if r := probe("udp-send 127.0.0.9 " + ts.udp + " spoofed  hello"); r != "ok sent" {
		t.Fatalf("udp-send: %q", r)
	}
	ts.waitLog(t, `^udp 127\.0\.0\.9:40000 -> `+regexp.QuoteMeta(ts.udp)+` "spoofed  hello"$`)
	if r := probe("udp-send 127.0.0.9:1234 " + ts.udp + " again"); r != "ok sent" {
		t.Fatalf("udp-send: %q", r)
	}
	ts.waitLog(t, `^udp 127\.0\.0\.9:1234 -> `+regexp.QuoteMeta(ts.udp)+` "again"$`)
}

func TestUDPSendArguments(t *testing.T) {
	for line, want := range map[string]string{
		"udp-send nowhere 127.0.0.1:7 x":                              `error bad source "nowhere"`,
		"udp-send 127.0.0.9 127.0.0.1 x":                              `error bad destination "127.0.0.1": want ip:port`,
		"udp-send ::1 [::1]:7 x":                                      "error udp-send: [::1]:40000 -> [::1]:7: IPv4 addresses only",
		"udp-send 127.0.0.9 127.0.0.1:7 " + strings.Repeat("x", 1401): "error udp-send: payload of 1401 bytes, at most 1400",
	} {
		if r := probe(line); r != want {
			t.Errorf("%.60s: %q, want %q", line, r, want)
		}
	}
}
