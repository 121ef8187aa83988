package qubesdb

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"testing"
)

type eventLog struct{ events []Event }

func (l *eventLog) report(e Event) { l.events = append(l.events, e) }

// take returns and forgets the events so far.
func (l *eventLog) take() []Event {
	e := l.events
	l.events = nil
	return e
}

func TestMirrorRulesOnlyOnMarker(t *testing.T) {
	var log eventLog
	m := NewMirror(log.report)
	m.Snapshot(map[string]string{
		"/qubes-ip": "10.137.0.1", "/qubes-gateway": "10.137.0.254",
		"/qubes-primary-dns": "10.139.1.1", "/qubes-secondary-dns": "10.139.1.2",
		"/connected-ips": "10.137.0.5 10.137.0.6",
		// committed
		"/qubes-firewall/10.137.0.5/policy": "drop", "/qubes-firewall/10.137.0.5/0000": "action=accept",
		"/qubes-firewall/10.137.0.5": "",
		// being written, not committed yet
		"/qubes-firewall/10.137.0.6/policy": "drop",
	})
	want := Event{Kind: EventSnapshot,
		AllRules: map[string]map[string]string{"10.137.0.5": {"policy": "drop", "0000": "action=accept"}},
		Uplink: Uplink{IP: "10.137.0.1", Gateway: "10.137.0.254",
			PrimaryDNS: "10.139.1.1", SecondaryDNS: "10.139.1.2"},
		ConnectedIPs: []string{"10.137.0.5", "10.137.0.6"}}
	if got := log.take(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("snapshot events %+v\nwant %+v", got, want)
	}

	// dom0 reloads 10.137.0.6: rm the directory, write sparse rules, commit.
	m.Remove("/qubes-firewall/10.137.0.6/")
	m.Write("/qubes-firewall/10.137.0.6/policy", "drop")
	m.Write("/qubes-firewall/10.137.0.6/0000", "action=accept proto=udp")
	m.Write("/qubes-firewall/10.137.0.6/0003", "action=drop dst4=10.0.0.0/8")
	m.Flush()
	if got := log.take(); len(got) != 0 {
		t.Fatalf("events before the commit marker: %+v", got)
	}
	m.Write("/qubes-firewall/10.137.0.6", "")
	rules := map[string]string{"policy": "drop", "0000": "action=accept proto=udp", "0003": "action=drop dst4=10.0.0.0/8"}
	if got := log.take(); len(got) != 1 || got[0].Kind != EventRules || got[0].IP != "10.137.0.6" || !maps.Equal(got[0].Rules, rules) {
		t.Fatalf("commit events %+v", got)
	}

	// Reload of 10.137.0.5 with fewer rules: the old 0000 must be gone.
	m.Remove("/qubes-firewall/10.137.0.5/")
	m.Write("/qubes-firewall/10.137.0.5/policy", "accept")
	m.Write("/qubes-firewall/10.137.0.5", "")
	if got := log.take(); len(got) != 1 || !maps.Equal(got[0].Rules, map[string]string{"policy": "accept"}) {
		t.Fatalf("reload events %+v", got)
	}

	// Removing the marker (here with the whole tree) reports "no rules".
	m.Remove("/qubes-firewall/")
	got := log.take()
	ips := []string{}
	for _, e := range got {
		if e.Kind != EventRules || e.Rules != nil {
			t.Fatalf("removal event %+v", e)
		}
		ips = append(ips, e.IP)
	}
	slices.Sort(ips)
	if !slices.Equal(ips, []string{"10.137.0.5", "10.137.0.6"}) {
		t.Fatalf("removal events for %q", ips)
	}
	if _, ok := m.Value("/qubes-firewall/10.137.0.6/0003"); ok {
		t.Fatal("entry survived a subtree removal")
	}
}

func TestMirrorCoalescing(t *testing.T) {
	var log eventLog
	m := NewMirror(log.report)
	m.Snapshot(map[string]string{"/qubes-ip": "10.137.0.1"})
	log.take()

	// A netvm change: five writes, one event at the batch boundary.
	m.Write("/qubes-ip", "10.138.0.1")
	m.Write("/qubes-gateway", "10.138.0.254")
	m.Write("/qubes-netmask", "255.255.255.0")
	m.Remove("/qubes-primary-dns")
	m.Write("/connected-ips", "10.137.0.9")
	if got := log.take(); len(got) != 0 {
		t.Fatalf("events before Flush: %+v", got)
	}
	m.Flush()
	want := []Event{
		{Kind: EventUplink, Uplink: Uplink{IP: "10.138.0.1", Gateway: "10.138.0.254", Netmask: "255.255.255.0"}},
		{Kind: EventConnectedIPs, ConnectedIPs: []string{"10.137.0.9"}},
	}
	if got := log.take(); !reflect.DeepEqual(got, want) {
		t.Fatalf("Flush events %+v\nwant %+v", got, want)
	}
	// Nothing new: nothing reported, even when a value is rewritten.
	m.Flush()
	m.Write("/qubes-ip", "10.138.0.1")
	m.Flush()
	if got := log.take(); len(got) != 0 {
		t.Fatalf("events without change: %+v", got)
	}
	// A pending uplink change is reported before a rules commit.
	m.Write("/qubes-primary-dns", "10.139.1.1")
	m.Write("/qubes-firewall/10.137.0.9", "")
	got := log.take()
	if len(got) != 2 || got[0].Kind != EventUplink || got[0].Uplink.PrimaryDNS != "10.139.1.1" || got[1].Kind != EventRules {
		t.Fatalf("order: %+v", got)
	}
}

// fakeConn replays a byte stream and swallows what is written.
type fakeConn struct{ r io.Reader }

func (f fakeConn) Read(b []byte) (int, error)  { return f.r.Read(b) }
func (f fakeConn) Write(b []byte) (int, error) { return len(b), nil }
func (f fakeConn) Close() error                { return nil }

func stream(ms ...Message) []byte {
	var b []byte
	for _, m := range ms {
		var err error
		if b, err = m.AppendTo(b); err != nil {
			panic(err)
		}
	}
	return b
}

// FuzzClientSession feeds hostile byte streams to both session loops as
// replies (daemon mode, first byte even) or dom0 pushes (peer mode). The
// stream ends, so a session must end too, without panicking.
func FuzzClientSession(f *testing.F) {
	daemon := stream(
		Message{Type: RespOK, Path: "/"},
		Message{Type: RespMultiRead, Path: "/a", Data: []byte("1")},
		Message{Type: RespWatch, Path: "/b"},
		Message{Type: RespMultiRead},
		Message{Type: RespRead, Path: "/b", Data: []byte("2")},
		Message{Type: RespWatch, Path: "/x/"},
		Message{Type: RespWatch, Path: "/c"},
		Message{Type: RespErrorNoEnt, Path: "/c"},
	)
	peer := stream(
		Message{Type: RespMultiRead, Path: "/a", Data: []byte("1")},
		Message{Type: RespMultiRead},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.5", Data: nil},
		Message{Type: CmdRm, Path: "/qubes-firewall/"},
	)
	f.Add(append([]byte{0}, daemon...))
	f.Add(append([]byte{1}, peer...))
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		mode := Mode(in[0] & 1)
		c := NewClient(nil, mode, func(string, ...any) {})
		m := NewMirror(func(Event) {})
		c.session(context.Background(), fakeConn{bytes.NewReader(in[1:])}, m)
	})
}

func TestSessionsOnRecordedStreams(t *testing.T) {
	// Both loops over recorded streams (also the fuzz seeds' shape): the
	// snapshot and the changes arrive, and the end of the stream ends the
	// session with an error.
	for _, tc := range []struct {
		mode Mode
		in   []byte
		want []string
	}{
		{Daemon, stream(
			Message{Type: RespOK, Path: "/"},
			Message{Type: RespMultiRead, Path: "/qubes-firewall/10.137.0.5/policy", Data: []byte("drop")},
			Message{Type: RespWatch, Path: "/qubes-firewall/10.137.0.5"},
			Message{Type: RespMultiRead},
			Message{Type: RespRead, Path: "/qubes-firewall/10.137.0.5"},
			Message{Type: RespWatch, Path: "/qubes-firewall/"}, // marker removed too
		), []string{"snapshot", "rules 10.137.0.5 map[policy:drop]", "rules 10.137.0.5 map[]"}},
		{Peer, stream(
			Message{Type: RespMultiRead, Path: "/qubes-firewall/10.137.0.5/policy", Data: []byte("drop")},
			Message{Type: RespMultiRead},
			Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.5"},
		), []string{"snapshot", "rules 10.137.0.5 map[policy:drop]"}},
	} {
		var got []string
		m := NewMirror(func(e Event) {
			if e.Kind == EventRules {
				got = append(got, fmt.Sprint(e.Kind, " ", e.IP, " ", e.Rules))
			} else {
				got = append(got, e.Kind.String())
			}
		})
		synced, err := NewClient(nil, tc.mode, t.Logf).session(context.Background(), fakeConn{bytes.NewReader(tc.in)}, m)
		if !synced || err == nil || !slices.Equal(got, tc.want) {
			t.Errorf("%v: session = %v, %v; events %q, want %q", tc.mode, synced, err, got, tc.want)
		}
	}
}
