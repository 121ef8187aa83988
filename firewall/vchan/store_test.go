package vchan

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
)

// fakeStore is a xenstore in memory: relative paths live under
// /local/domain/<domid>, watches fire on set-up and on changes at or below
// their path.
type fakeStore struct {
	self    string
	mu      sync.Mutex
	data    map[string]string
	watches map[string][]chan struct{}
}

var errNoEnt = errors.New("ENOENT")

func newFakeStore(domid string) *fakeStore {
	return &fakeStore{self: domid, data: map[string]string{"/local/domain/" + domid + "/domid": domid},
		watches: map[string][]chan struct{}{}}
}

func (s *fakeStore) abs(p string) string {
	if strings.HasPrefix(p, "/") {
		return p
	}
	return "/local/domain/" + s.self + "/" + p
}

func (s *fakeStore) Read(p string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.data[s.abs(p)]
	if !ok {
		return "", errNoEnt
	}
	return v, nil
}

func (s *fakeStore) fire(p string) {
	for w, chs := range s.watches {
		if p == w || strings.HasPrefix(p, w+"/") || strings.HasPrefix(w, p+"/") {
			for _, ch := range chs {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		}
	}
}

func (s *fakeStore) Write(p, v string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.data[s.abs(p)] = v
	s.fire(s.abs(p))
	return nil
}

func (s *fakeStore) Rm(p string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p = s.abs(p)
	for k := range s.data {
		if k == p || strings.HasPrefix(k, p+"/") {
			delete(s.data, k)
		}
	}
	s.fire(p)
	return nil
}

func (s *fakeStore) Watch(ctx context.Context, p string) (<-chan struct{}, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{}, 1)
	ch <- struct{}{}
	s.watches[s.abs(p)] = append(s.watches[s.abs(p)], ch)
	return ch, nil
}

func TestPaths(t *testing.T) {
	if got := clientPath(0, 7, QubesDBPort); got != "/local/domain/0/data/vchan/7/111" {
		t.Errorf("clientPath = %q", got)
	}
	if got := serverPath(0, QrexecPort); got != "data/vchan/0/512" {
		t.Errorf("serverPath = %q", got)
	}
}

func TestParse(t *testing.T) {
	for s, want := range map[string]int{"0": 0, "7": 7, "32751": 32751} {
		if d, err := parseDomid(s); err != nil || d != want {
			t.Errorf("parseDomid(%q) = %d, %v", s, d, err)
		}
	}
	for _, s := range []string{"", "00", "07", "-1", "+1", "32752", "65535", "70000", "1a", " 1", "1 "} {
		if d, err := parseDomid(s); err == nil {
			t.Errorf("parseDomid(%q) = %d, want error", s, d)
		}
	}
	for s, want := range map[string]uint32{"1": 1, "8": 8, "4294967295": 4294967295, "0010": 10} {
		if v, err := parseRef("ref", s); err != nil || v != want {
			t.Errorf("parseRef(%q) = %d, %v", s, v, err)
		}
	}
	for _, s := range []string{"", "0", "-1", "+5", "4294967296", "12 ", "0x10", "ring"} {
		if v, err := parseRef("ref", s); err == nil {
			t.Errorf("parseRef(%q) = %d, want error", s, v)
		}
	}
}

func TestWaitServer(t *testing.T) {
	st := newFakeStore("7")
	base := clientPath(0, 7, QubesDBPort)
	type result struct {
		ref, port uint32
		err       error
	}
	done := make(chan result, 1)
	go func() {
		ref, port, err := waitServer(context.Background(), st, base)
		done <- result{ref, port, err}
	}()
	// Nothing yet, then the server publishes (ring-ref first).
	st.Write(base+"/ring-ref", "1234")
	st.Write(base+"/event-channel", "")
	st.Write(base+"/event-channel", "67")
	if r := <-done; r.err != nil || r.ref != 1234 || r.port != 67 {
		t.Fatalf("waitServer = %+v", r)
	}

	st.Write(base+"/ring-ref", "x")
	if _, _, err := waitServer(context.Background(), st, base); err == nil {
		t.Error("bad ring-ref accepted")
	}
	st.Write(base+"/ring-ref", "5")
	st.Write(base+"/event-channel", "0")
	if _, _, err := waitServer(context.Background(), st, base); err == nil {
		t.Error("event channel 0 accepted")
	}

	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, _, err := waitServer(ctx, st, clientPath(0, 7, 5))
		done <- result{err: err}
	}()
	cancel()
	if r := <-done; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("canceled wait: %v", r.err)
	}
}

func TestDialChecks(t *testing.T) {
	ctx := context.Background()
	if _, err := Dial(ctx, newFakeStore("0"), 0, QubesDBPort); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("dial to self: %v", err)
	}
	if _, err := Dial(ctx, newFakeStore("7"), 0x7ff0, 1); err == nil {
		t.Error("reserved domain accepted")
	}
	if _, err := Dial(ctx, newFakeStore("7"), 0, -1); err == nil {
		t.Error("negative port accepted")
	}
	st := newFakeStore("7")
	st.Write("domid", "x")
	if _, err := Dial(ctx, st, 0, 1); err == nil {
		t.Error("bad own domid accepted")
	}
	if _, err := Listen(ctx, newFakeStore("7"), 0, 1, 1<<21, 0); err == nil {
		t.Error("2 MiB ring accepted")
	}
}

func TestPublish(t *testing.T) {
	st := newFakeStore("7")
	if err := publish(st, serverPath(0, QrexecPort), 99, 12); err != nil {
		t.Fatal(err)
	}
	base := clientPath(7, 0, QrexecPort)
	ref, port, err := waitServer(context.Background(), st, base)
	if err != nil || ref != 99 || port != 12 {
		t.Fatalf("published %d/%d, %v", ref, port, err)
	}
}
