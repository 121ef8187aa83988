package dispatch

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
)

// scriptedLoop is a Loop that hands Serve's input one batch, then ends as
// told: it stands for afpacket.Loop, whose own tests read real sockets.
type scriptedLoop struct {
	frames []link.Frame
	end    error
	link   link.Link
}

func (s *scriptedLoop) Serve(ctx context.Context, l link.Link, input func([]link.Frame)) error {
	s.link = l
	input(s.frames)
	if s.end == nil {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.end
}

// TestServeWithLoop: with Config.Loop, Serve has the loop read the port's
// link, the batches reach the port's Input, and the loop's end maps to
// Serve's contract: a closed link is a normal end (nil), a failure is
// wrapped with the link's name, a done context is its error.
func TestServeWithLoop(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  error
		want func(error) bool
	}{
		{"closed", link.ErrClosed, func(err error) bool { return err == nil }},
		{"failed", errors.New("interface gone"), func(err error) bool {
			return err != nil && strings.Contains(err.Error(), "serve vif: interface gone")
		}},
		{"context", nil, func(err error) bool { return errors.Is(err, context.Canceled) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frame := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: 17, sport: 40000, dport: 53, payload: []byte("q")}.bytes()
			lp := &scriptedLoop{frames: toFrames([][]byte{frame}), end: tc.end}
			d := New(Config{Logf: t.Logf, Loop: lp})
			upA, upB := linktest.NewPipe("eth0", upMAC, "netvm", gwMAC, 1500)
			up := d.Attach(upA)
			a, _ := linktest.NewPipe("vif", vifMAC, "client", c1MAC, 1500)
			p := d.Attach(a)
			if err := d.AddClient(client1, c1MAC, p); err != nil {
				t.Fatal(err)
			}
			d.SetRules(client1, acceptRS)
			d.SetUplink(&Uplink{Port: up, IP: fwIP, Gateway: gwIP})
			upB.TryRead() // gratuitous ARP and gateway query
			ctx, cancel := context.WithCancel(context.Background())
			if tc.end == nil {
				cancel()
			}
			err := d.Serve(ctx, p)
			cancel()
			if !tc.want(err) {
				t.Fatalf("Serve = %v", err)
			}
			if lp.link != a {
				t.Fatalf("the loop was given %v, want the port's link", lp.link)
			}
			if got := upB.TryRead(); len(got) != 1 {
				t.Fatalf("%d frames reached the uplink, want the client's one", len(got))
			}
		})
	}
}
