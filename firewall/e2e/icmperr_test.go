package e2e

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// icmpErrorsOnlyToTheFlowsRemote is defect 1 of the data-path review,
// end to end: a client whose rules allow only DNS gets a DNS reply, then
// sends ICMP "port unreachable" messages quoting it. Only a short one to
// the DNS server (the flow's remote) may arrive upstream; one to another
// host, or one longer than 576 bytes, must not (before, both were NATed
// and sent: a way to send data anywhere). The netvm's namespace captures
// every ICMP message addressed to it.
func icmpErrorsOnlyToTheFlowsRemote(t *testing.T, e *env) {
	e.setRules(client1IP, "action=accept specialtarget=dns")
	// What arrives upstream: every ICMP message to the netvm's addresses,
	// with the address it was sent to.
	raw := e.up1.ListenPacket(t, "ip4:icmp", "0.0.0.0")
	cap := ipv4.NewPacketConn(raw)
	if err := cap.SetControlMessage(ipv4.FlagDst, true); err != nil {
		t.Fatal(err)
	}
	// A DNS query from a known port, so the error can quote its reply.
	const port = 40053
	udp := e.cl1.ListenPacket(t, "udp4", net.JoinHostPort(client1IP, "40053"))
	q := dnsmessage.Message{Header: dnsmessage.Header{ID: 7, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName("allowed.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}
	qb, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := udp.WriteTo(qb, &net.UDPAddr{IP: net.ParseIP(dnsIP), Port: 53}); err != nil {
		t.Fatal(err)
	}
	udp.SetReadDeadline(time.Now().Add(10 * time.Second))
	reply := make([]byte, 1500)
	n, _, err := udp.ReadFrom(reply)
	if err != nil {
		t.Fatalf("DNS reply: %v", err)
	}
	reply = reply[:n]

	// quote is the reply's IP datagram as the client received it, with
	// size bytes of UDP payload: the reply's, cut or padded.
	quote := func(size int) []byte {
		payload := make([]byte, size)
		copy(payload, reply)
		b := make([]byte, 28+len(payload))
		b[0], b[8], b[9] = 0x45, 63, 17
		binary.BigEndian.PutUint16(b[2:], uint16(28+len(reply)))
		copy(b[12:16], net.ParseIP(dnsIP).To4())
		copy(b[16:20], net.ParseIP(client1IP).To4())
		binary.BigEndian.PutUint16(b[20:], 53)
		binary.BigEndian.PutUint16(b[22:], port)
		binary.BigEndian.PutUint16(b[24:], uint16(8+len(reply)))
		copy(b[28:], payload)
		return b
	}
	send := func(dst string, q []byte) {
		t.Helper()
		m := icmp.Message{Type: ipv4.ICMPTypeDestinationUnreachable, Code: 3, Body: &icmp.DstUnreach{Data: q}}
		b, err := m.Marshal(nil)
		if err != nil {
			t.Fatal(err)
		}
		c := e.cl1.ListenPacket(t, "ip4:icmp", client1IP)
		if _, err := c.WriteTo(b, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
			t.Fatal(err)
		}
	}
	send(otherIP, quote(len(reply))) // the whole reply, to another host
	send(otherIP, quote(0))          // a short one, to another host
	send(dnsIP, quote(1000))         // to the remote, but over 576 bytes in all
	send(dnsIP, quote(0))            // the one that may go
	buf := make([]byte, 2048)
	got := map[string][]int{}
	cap.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, cm, _, err := cap.ReadFrom(buf)
		if err != nil {
			break // the deadline: everything that was coming has come
		}
		if m, err := icmp.ParseMessage(1, buf[:n]); err == nil && m.Type == ipv4.ICMPTypeDestinationUnreachable && cm != nil {
			got[cm.Dst.String()] = append(got[cm.Dst.String()], n)
			if cm.Dst.String() == dnsIP {
				// The legitimate one is in; give the others a moment
				// more, then stop.
				cap.SetReadDeadline(time.Now().Add(time.Second))
			}
		}
	}
	if len(got[otherIP]) > 0 {
		t.Errorf("ICMP errors reached %s, a host the client has no flow with: sizes %v", otherIP, got[otherIP])
	}
	if len(got[dnsIP]) != 1 || got[dnsIP][0] != 8+28 {
		t.Errorf("ICMP errors to the DNS server: sizes %v, want exactly the short one", got[dnsIP])
	}
}
