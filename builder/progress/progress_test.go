package progress

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// clock is a manual time source.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestBarRedrawsInPlaceAndClears(t *testing.T) {
	var out bytes.Buffer
	c := &clock{t: time.Unix(0, 0)}
	m := New(&out)
	m.now = c.now

	b := m.Start("hashing linux-source", 40<<20)
	b.Write(make([]byte, 10<<20)) // first write draws at once
	b.Write(make([]byte, 10<<20)) // within the interval: not drawn
	c.t = c.t.Add(time.Second)
	b.Write(make([]byte, 10<<20))
	b.Done()

	want := "\rhashing linux-source: 10 MB of 40 MB (25%)\x1b[K" +
		"\rhashing linux-source: 30 MB of 40 MB (75%)\x1b[K" +
		"\r\x1b[K"
	if got := out.String(); got != want {
		t.Errorf("drawn:\n%q\nwant\n%q", got, want)
	}
}

func TestCountBarUnknownTotalAndConcurrentAdds(t *testing.T) {
	var out bytes.Buffer
	m := New(&out)
	m.every = 0
	b := m.StartCount("modules", 100)
	var wg sync.WaitGroup
	for range 100 {
		wg.Add(1)
		go func() { defer wg.Done(); b.Add(1) }()
	}
	wg.Wait()
	if !strings.Contains(out.String(), "\rmodules: 100 of 100\x1b[K") {
		t.Errorf("no final count in %q", out.String())
	}
	out.Reset()
	u := m.Start("downloading x", 0)
	u.Write(make([]byte, 1536<<10))
	if got := out.String(); got != "\rdownloading x: 1.5 MB\x1b[K" {
		t.Errorf("unknown size drawn as %q", got)
	}
}

// Off a terminal nothing is written, not even the clearing sequence.
func TestQuietOffTerminal(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := ForFile(f)
	if m != nil {
		t.Fatalf("ForFile(regular file) = %v, want nil", m)
	}
	b := m.Start("hashing", 1<<20)
	b.Write(make([]byte, 1<<20))
	b.Add(5)
	b.Done()
	m.StartCount("n", 3).Done()
	if st, _ := f.Stat(); st.Size() != 0 {
		t.Errorf("wrote %d bytes to a non-terminal", st.Size())
	}
}
