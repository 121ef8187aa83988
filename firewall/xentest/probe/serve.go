package main

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// server is dom0's end of the agent's network commands: TCP line echo and
// UDP datagram echo, both answering "whoami" with the peer's address, and
// a log a test can grep for what reached dom0 (a spoofed datagram, say).
type server struct {
	log   io.Writer
	logMu sync.Mutex

	mu      sync.Mutex
	closers []io.Closer // the listeners
	wg      sync.WaitGroup
}

// logf writes one line in one Write: on an O_APPEND file it lands whole,
// at once, and after whatever else was appended.
func (s *server) logf(format string, args ...any) {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	fmt.Fprintf(s.log, format+"\n", args...)
}

// serve runs loop until c, a listener, is closed by Close.
func (s *server) serve(c io.Closer, loop func()) {
	s.mu.Lock()
	s.closers = append(s.closers, c)
	s.mu.Unlock()
	s.wg.Go(loop)
}

// Close stops the listeners and waits for their loops. Open TCP
// connections live on until their clients close them.
func (s *server) Close() {
	s.mu.Lock()
	for _, c := range s.closers {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Listen serves network ("tcp" or "udp") on addr and returns the bound
// address.
func (s *server) Listen(network, addr string) (net.Addr, error) {
	if network == "udp" {
		return s.listenUDP(addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s.serve(ln, func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			go s.serveTCP(c)
		}
	})
	return ln.Addr(), nil
}

func (s *server) serveTCP(c net.Conn) {
	defer c.Close()
	tag := fmt.Sprintf("tcp %v -> %v", c.RemoteAddr(), c.LocalAddr())
	s.logf("%s open", tag)
	sc := bufio.NewScanner(c)
	lines, first := 0, ""
	for sc.Scan() {
		line := sc.Text()
		if lines == 0 {
			first = line
		}
		lines++
		if line == "whoami" {
			line = "you are " + c.RemoteAddr().String()
		}
		if _, err := io.WriteString(c, line+"\n"); err != nil {
			break
		}
	}
	e := "none"
	if sc.Err() != nil {
		e = sc.Err().Error()
	}
	s.logf("%s close lines=%d first=%q err=%s", tag, lines, clip(first, 64), e)
}

// listenUDP serves UDP echo on an IPv4 address. The socket asks for
// IP_PKTINFO: on a wildcard address that is the only way to log where a
// datagram was sent and to answer from there, as the client's connected
// socket drops a reply from any other address.
func (s *server) listenUDP(addr string) (net.Addr, error) {
	la, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, err
	}
	pc, err := net.ListenUDP("udp4", la)
	if err != nil {
		return nil, err
	}
	var serr error
	rc, err := pc.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		})
	}
	if err = cmp.Or(err, serr); err != nil {
		pc.Close()
		return nil, fmt.Errorf("udp %s: IP_PKTINFO: %w", addr, err)
	}
	s.serve(pc, func() { s.serveUDP(pc) })
	return pc.LocalAddr(), nil
}

func (s *server) serveUDP(pc *net.UDPConn) {
	local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	buf := make([]byte, 65536)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofInet4Pktinfo))
	for {
		n, oobn, _, from, err := pc.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			return // closed
		}
		dst, spec := pktinfo(oob[:oobn])
		to := local
		if dst.IsValid() {
			to = netip.AddrPortFrom(dst, local.Port())
		}
		p := buf[:n]
		s.logf("udp %v -> %v %q", from, to, clip(string(p), 64))
		if strings.TrimSuffix(string(p), "\n") == "whoami" {
			p = []byte("you are " + from.String() + "\n")
		}
		var reply []byte
		if spec.IsValid() {
			reply = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: spec.As4()})
		}
		pc.WriteMsgUDPAddrPort(p, reply, from) // to a spoofed source: lost, no matter
	}
}

// pktinfo returns a datagram's header destination and the local address
// to answer from, out of its struct in_pktinfo: ipi_ifindex (4 bytes),
// ipi_spec_dst, ipi_addr.
func pktinfo(oob []byte) (dst, spec netip.Addr) {
	msgs, _ := unix.ParseSocketControlMessage(oob)
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= 12 {
			spec = netip.AddrFrom4([4]byte(m.Data[4:8]))
			dst = netip.AddrFrom4([4]byte(m.Data[8:12]))
		}
	}
	return dst, spec
}
