package boot

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Excerpts of Linux 6.1's /proc/self/status (fs/proc/array.c, tabs after
// the colon) and /proc/meminfo (fs/proc/meminfo.c, spaces), as the
// firewall VM's kernel writes them.
const (
	sampleStatus = "Name:\tinit\nUmask:\t0022\nState:\tS (sleeping)\nPid:\t1\n" +
		"VmPeak:\t 1243520 kB\nVmSize:\t 1243520 kB\nVmLck:\t       0 kB\nVmPin:\t       0 kB\n" +
		"VmHWM:\t   11264 kB\nVmRSS:\t    9830 kB\nRssAnon:\t    4096 kB\n" +
		"Threads:\t5\nSigQ:\t0/63\n"
	sampleMeminfo = "MemTotal:          20480 kB\nMemFree:            3072 kB\nMemAvailable:       4250 kB\n" +
		"Buffers:               0 kB\nCached:             9000 kB\nShmem:              3584 kB\n" +
		"Slab:               2048 kB\nSReclaimable:        512 kB\nSUnreclaim:         1536 kB\n" +
		"KernelStack:         512 kB\nPageTables:          256 kB\n"
)

func TestParseMemory(t *testing.T) {
	m, err := parseMemory([]byte(sampleStatus), []byte(sampleMeminfo))
	if err != nil {
		t.Fatal(err)
	}
	want := Memory{HWM: 11264, RSS: 9830, Available: 4250, Total: 20480,
		Free: 3072, Slab: 2048, SUnreclaim: 1536, Shmem: 3584, KernelStack: 512, PageTables: 256, Anon: 4096}
	if m != want {
		t.Errorf("parsed %+v, want %+v", m, want)
	}
	if got, want := m.String(), "VmHWM 11.0 MiB, VmRSS 9.6 MiB, MemAvailable 4.2 MiB, MemTotal 20.0 MiB "+
		"(MemFree 3.0, Slab 2.0, SUnreclaim 1.5, Shmem 3.5, KernelStack 0.5, PageTables 0.2, RssAnon 4.0 MiB)"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	// No newline at the end of the last line; the breakdown's fields are
	// optional (-1, not shown).
	m, err = parseMemory([]byte("VmHWM:\t1 kB\nVmRSS:\t2 kB"), []byte("MemTotal: 4 kB\nMemAvailable: 3 kB"))
	if want := (Memory{1, 2, 3, 4, -1, -1, -1, -1, -1, -1, -1}); err != nil || m != want {
		t.Errorf("without final newlines: %+v, %v, want %+v", m, err, want)
	}
	if got, want := m.String(), "VmHWM 0.0 MiB, VmRSS 0.0 MiB, MemAvailable 0.0 MiB, MemTotal 0.0 MiB"; got != want {
		t.Errorf("String() without the breakdown = %q, want %q", got, want)
	}
}

// Malformed text is an error that names the file and the key, never a
// panic or a made-up value.
func TestParseMemoryRefusesMalformed(t *testing.T) {
	for _, c := range []struct {
		name, status, meminfo, want string
	}{
		{"empty", "", "", "/proc/self/status: no VmHWM line"},
		{"no meminfo key", sampleStatus, "MemTotal: 20480 kB\n", "/proc/meminfo: no MemAvailable line"},
		{"no MemTotal", sampleStatus, "MemAvailable: 4250 kB\n", "/proc/meminfo: no MemTotal line"},
		{"no unit", strings.Replace(sampleStatus, "11264 kB", "11264", 1), sampleMeminfo, `VmHWM: "\t   11264" does not end in " kB"`},
		{"other unit", strings.Replace(sampleStatus, "9830 kB", "9830 MB", 1), sampleMeminfo, "VmRSS:"},
		{"negative", strings.Replace(sampleStatus, "11264 kB", "-11264 kB", 1), sampleMeminfo, "not a decimal number"},
		{"hex", sampleStatus, strings.Replace(sampleMeminfo, "4250 kB", "0x10 kB", 1), "MemAvailable:"},
		{"leading zero", strings.Replace(sampleStatus, "11264 kB", "011264 kB", 1), sampleMeminfo, "leading zero"},
		{"no digits", strings.Replace(sampleStatus, "11264 kB", " kB", 1), sampleMeminfo, "does not end in"},
		{"too many digits", strings.Replace(sampleStatus, "11264 kB", "99999999999999999999 kB", 1), sampleMeminfo, "want 1 to 13 digits"},
		{"too large", strings.Replace(sampleStatus, "11264 kB", "9999999999999 kB", 1), sampleMeminfo, "out of range"},
		{"twice", sampleStatus + "VmHWM:\t1 kB\n", sampleMeminfo, "VmHWM appears twice"},
		{"binary", "VmHWM:\x00\xff kB\n", sampleMeminfo, "VmHWM:"},
	} {
		m, err := parseMemory([]byte(c.status), []byte(c.meminfo))
		if err == nil {
			t.Errorf("%s: accepted as %+v", c.name, m)
		} else if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q, want it to contain %q", c.name, err, c.want)
		}
	}
}

// A key that only ends like the one wanted ("xVmHWM") or a line without
// a colon does not count.
func TestKBFieldMatchesWholeKey(t *testing.T) {
	if v, err := kBField([]byte("xVmHWM:\t5 kB\nVmHWM\nVmHWM:\t7 kB\n"), "VmHWM"); err != nil || v != 7 {
		t.Errorf("kBField = %d, %v; want 7", v, err)
	}
}

func TestReadMemory(t *testing.T) {
	m, err := ReadMemory()
	if err != nil {
		t.Fatal(err)
	}
	// The kernel reports VmHWM as the maximum of the peak and the
	// current resident set.
	if m.RSS <= 0 || m.HWM < m.RSS || m.Available <= 0 || m.Total < m.Available {
		t.Errorf("this process: %+v", m)
	}
	if s := MemoryStats(); !strings.HasPrefix(s, "memory: VmHWM ") {
		t.Errorf("MemoryStats() = %q", s)
	}
}

func TestReadMemoryErrors(t *testing.T) {
	dir := t.TempDir()
	status, meminfo := filepath.Join(dir, "status"), filepath.Join(dir, "meminfo")
	if err := os.WriteFile(status, []byte(sampleStatus), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readMemory(status, meminfo); err == nil || !strings.Contains(err.Error(), meminfo) {
		t.Errorf("missing meminfo: %v", err)
	}
	big := strings.Repeat("Padding:\t0 kB\n", procLimit/14+1) + sampleMeminfo
	if err := os.WriteFile(meminfo, []byte(big), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readMemory(status, meminfo); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("oversized meminfo: %v", err)
	}
	if err := os.WriteFile(meminfo, []byte(sampleMeminfo), 0o644); err != nil {
		t.Fatal(err)
	}
	if m, err := readMemory(status, meminfo); err != nil || m.Available != 4250 {
		t.Errorf("from files: %+v, %v", m, err)
	}
}

// FuzzParseMemory: whatever the text, no panic; a value parseMemory
// accepts is in range and is written in the text on its key's line as
// "KEY:<blanks>N kB", the way the kernel writes it; a field of the
// breakdown is -1 (absent) only when no line has its key.
func FuzzParseMemory(f *testing.F) {
	f.Add(sampleStatus, sampleMeminfo)
	f.Add("VmHWM:\t1 kB\nVmRSS:\t2 kB", "MemTotal: 4 kB\nMemAvailable: 3 kB")
	f.Add("VmHWM:\t-1 kB\n", "")
	f.Add("VmHWM:\t1 kB\nVmHWM:\t1 kB\n", "MemAvailable:")
	f.Fuzz(func(t *testing.T, status, meminfo string) {
		m, err := parseMemory([]byte(status), []byte(meminfo))
		if err != nil {
			if m != (Memory{}) {
				t.Fatalf("error %v with figures %+v", err, m)
			}
			return
		}
		for _, v := range []struct {
			text, key string
			n         int64
			optional  bool
		}{
			{status, "VmHWM", m.HWM, false}, {status, "VmRSS", m.RSS, false},
			{meminfo, "MemAvailable", m.Available, false}, {meminfo, "MemTotal", m.Total, false},
			{meminfo, "MemFree", m.Free, true}, {meminfo, "Slab", m.Slab, true}, {meminfo, "SUnreclaim", m.SUnreclaim, true},
			{meminfo, "Shmem", m.Shmem, true}, {meminfo, "KernelStack", m.KernelStack, true},
			{meminfo, "PageTables", m.PageTables, true}, {status, "RssAnon", m.Anon, true},
		} {
			if v.optional && v.n == -1 {
				if strings.HasPrefix(v.text, v.key+":") || strings.Contains(v.text, "\n"+v.key+":") {
					t.Fatalf("%s has a line but was taken as absent", v.key)
				}
				continue
			}
			if v.n < 0 || v.n > maxKB {
				t.Fatalf("%s = %d out of range", v.key, v.n)
			}
			found := false
			for _, line := range strings.Split(v.text, "\n") {
				val, ok := strings.CutPrefix(line, v.key+":")
				if ok && strings.TrimLeft(val, " \t") == fmt.Sprintf("%d kB", v.n) {
					found = true
				}
			}
			if !found {
				t.Fatalf("%s = %d, but the text has no line %q", v.key, v.n, fmt.Sprintf("%s: %d kB", v.key, v.n))
			}
		}
		_ = m.String()
	})
}
