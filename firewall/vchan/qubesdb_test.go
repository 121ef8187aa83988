package vchan_test

import (
	"bufio"
	"context"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb/qubesdbtest"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/vchan"
)

// TestQubesDBOverVchan runs the real QubesDB peer client against the real
// dom0-mode server, over in-memory vchans with QubesDB's ring sizes (4096
// bytes each way, order 12): snapshot, pushed changes, and a reconnection
// after the server side exits.
func TestQubesDBOverVchan(t *testing.T) {
	srv := qubesdbtest.NewServer(t.Logf)
	for k, v := range map[string]string{
		qubesdb.KeyIP:                        "10.137.0.5",
		qubesdb.KeyGateway:                   "10.137.0.1",
		"/qubes-firewall/10.137.0.9/policy":  "drop",
		"/qubes-firewall/10.137.0.9/0000":    "action=accept proto=tcp dstports=443-443",
		"/qubes-firewall/10.137.0.9":         "",
		"/qubes-service/big":                 strings.Repeat("x", 3000), // spans ring wraps
		qubesdb.KeyConnectedIPs:              "10.137.0.9",
		"/qubes-vm-type":                     "ProxyVM",
		"/qubes-firewall/10.137.0.10/policy": "drop",
	} {
		if err := srv.Write(k, v); err != nil {
			t.Fatal(err)
		}
	}

	var mu sync.Mutex
	var serverEnds []*vchan.Conn
	served := make(chan error, 8)
	dial := func(ctx context.Context) (io.ReadWriteCloser, error) {
		client, server, err := vchan.Pipe(12, 12)
		if err != nil {
			return nil, err
		}
		mu.Lock()
		serverEnds = append(serverEnds, server)
		mu.Unlock()
		go func() { served <- srv.ServePeer(server) }()
		return client, nil
	}
	events := make(chan qubesdb.Event, 64)
	m := qubesdb.NewMirror(func(e qubesdb.Event) { events <- e })
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- qubesdb.NewClient(dial, qubesdb.Peer, t.Logf).Run(ctx, m) }()

	e := <-events
	if e.Kind != qubesdb.EventSnapshot || e.Uplink.IP != "10.137.0.5" || e.AllRules["10.137.0.9"]["0000"] != "action=accept proto=tcp dstports=443-443" {
		t.Fatalf("first event %+v, want the snapshot", e)
	}
	if _, ok := e.AllRules["10.137.0.10"]; ok {
		t.Error("rules without a commit marker in the snapshot")
	}

	// Pushed changes arrive (and were acknowledged, or ServePeer would
	// have failed: it treats any reply but RESP_OK/RESP_ERROR as fatal).
	srv.Write(qubesdb.KeyIP, "10.137.0.6")
	if e := <-events; e.Kind != qubesdb.EventUplink || e.Uplink.IP != "10.137.0.6" {
		t.Fatalf("event %+v, want the new uplink", e)
	}
	srv.Write("/qubes-firewall/10.137.0.10/0000", "action=drop")
	srv.Write("/qubes-firewall/10.137.0.10", "")
	if e := <-events; e.Kind != qubesdb.EventRules || e.IP != "10.137.0.10" || e.Rules["0000"] != "action=drop" {
		t.Fatalf("event %+v, want the committed rules", e)
	}

	// dom0's daemon goes away: its end closes (srv_live = 0). The client
	// sees EOF, dials again and gets a fresh snapshot with what changed
	// meanwhile.
	mu.Lock()
	serverEnds[0].Close()
	mu.Unlock()
	if err := <-served; err != nil {
		t.Fatalf("first session: %v", err)
	}
	srv.Write(qubesdb.KeyGateway, "10.137.0.2")
	e = <-events
	if e.Kind != qubesdb.EventSnapshot || e.Uplink.Gateway != "10.137.0.2" || e.Uplink.IP != "10.137.0.6" {
		t.Fatalf("event %+v, want a new snapshot", e)
	}
	srv.Write(qubesdb.KeyConnectedIPs, "10.137.0.9 10.137.0.10")
	if e := <-events; e.Kind != qubesdb.EventConnectedIPs || len(e.ConnectedIPs) != 2 {
		t.Fatalf("event %+v, want connected IPs", e)
	}

	cancel()
	if err := <-ran; err != context.Canceled {
		t.Fatalf("Run = %v", err)
	}
	if err := <-served; err != nil {
		t.Fatalf("second session: %v", err)
	}
	mu.Lock()
	if len(serverEnds) != 2 {
		t.Errorf("%d connections, want 2", len(serverEnds))
	}
	mu.Unlock()
}

// TestQubesDBAcks checks the replies byte for byte, with the test as dom0:
// every pushed WRITE and RM is answered RESP_OK, even an RM of an entry the
// VM never had (dom0's daemon treats RESP_ERROR_NOENT as fatal).
func TestQubesDBAcks(t *testing.T) {
	client, dom0, err := vchan.Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer dom0.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := make(chan qubesdb.Event, 16)
	m := qubesdb.NewMirror(func(e qubesdb.Event) { events <- e })
	dialed := false
	dial := func(ctx context.Context) (io.ReadWriteCloser, error) {
		if dialed {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		dialed = true
		return client, nil
	}
	go qubesdb.NewClient(dial, qubesdb.Peer, t.Logf).Run(ctx, m)

	r := bufio.NewReader(dom0)
	req, err := qubesdb.ReadMessage(r)
	if err != nil || req.Type != qubesdb.CmdMultiRead || req.Path != "" {
		t.Fatalf("first request %v, %v; want MULTIREAD of everything", req, err)
	}
	send := func(m qubesdb.Message) {
		t.Helper()
		if err := qubesdb.WriteMessage(dom0, m); err != nil {
			t.Fatal(err)
		}
	}
	send(qubesdb.Message{Type: qubesdb.RespMultiRead, Path: qubesdb.KeyIP, Data: []byte("10.137.0.5")})
	send(qubesdb.Message{Type: qubesdb.RespMultiRead})
	if e := <-events; e.Kind != qubesdb.EventSnapshot || e.Uplink.IP != "10.137.0.5" {
		t.Fatalf("event %+v", e)
	}
	for _, push := range []qubesdb.Message{
		{Type: qubesdb.CmdWrite, Path: qubesdb.KeyIP, Data: []byte("10.137.0.7")},
		{Type: qubesdb.CmdRm, Path: "/never-written"},
		{Type: qubesdb.CmdRm, Path: "/qubes-firewall/10.137.0.9/"},
	} {
		send(push)
		reply, err := qubesdb.ReadMessage(r)
		if err != nil || reply.Type != qubesdb.RespOK || reply.Path != push.Path {
			t.Fatalf("reply to %v: %v, %v; want RESP_OK %q", push, reply, err, push.Path)
		}
	}
	if e := <-events; e.Kind != qubesdb.EventUplink || e.Uplink.IP != "10.137.0.7" {
		t.Fatalf("event %+v", e)
	}
}
