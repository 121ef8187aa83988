package boot

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Memory is what the kernel says about the firewall's memory, in kB: the
// figures that tell whether a VM size carries its clients.
type Memory struct {
	HWM       int64 // VmHWM (/proc/self/status): the process's peak resident set
	RSS       int64 // VmRSS: its resident set now
	Available int64 // MemAvailable (/proc/meminfo): what the VM can still hand out
	// Total is MemTotal, the memory the kernel manages. Under Xen it
	// shrinks when the kernel gives pages back to Xen to map grants into
	// (netback does for every client vif, without unpopulated-alloc).
	Total int64

	// Where the VM's memory is, for the stats line: -1 when the kernel
	// does not report the field (only the four above are required).
	Free        int64 // MemFree
	Slab        int64 // Slab: the kernel's object caches
	SUnreclaim  int64 // SUnreclaim: the part of Slab it cannot free
	Shmem       int64 // Shmem: tmpfs (the unpacked initramfs is ramfs, not here)
	KernelStack int64 // KernelStack: netback's threads among others
	PageTables  int64 // PageTables
	Anon        int64 // RssAnon (/proc/self/status): the firewall's heap and stacks
}

// The files ReadMemory reads.
const (
	procStatus  = "/proc/self/status"
	procMeminfo = "/proc/meminfo"
)

// procLimit bounds what is read of a /proc file: both are about 1.5 KiB.
const procLimit = 16 << 10

// ReadMemory reads the process's and the VM's memory from /proc.
func ReadMemory() (Memory, error) {
	return readMemory(procStatus, procMeminfo)
}

func readMemory(status, meminfo string) (Memory, error) {
	s, err := readProc(status)
	if err != nil {
		return Memory{}, err
	}
	mi, err := readProc(meminfo)
	if err != nil {
		return Memory{}, err
	}
	return parseMemory(s, mi)
}

// readProc reads a small /proc file whole, refusing one larger than
// procLimit.
func readProc(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, procLimit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > procLimit {
		return nil, fmt.Errorf("read %s: longer than %d bytes", path, procLimit)
	}
	return b, nil
}

// memField is one figure of a Memory: the file and key the kernel writes
// it under, and whether it belongs to the optional breakdown.
type memField struct {
	status   bool // /proc/self/status; otherwise /proc/meminfo
	key      string
	dst      *int64
	optional bool // part of the breakdown: -1 when the kernel has no such line
}

// fields lists m's figures in the order the stats line shows them; both
// parseMemory and String read this one table.
func (m *Memory) fields() []memField {
	return []memField{
		{true, "VmHWM", &m.HWM, false},
		{true, "VmRSS", &m.RSS, false},
		{false, "MemAvailable", &m.Available, false},
		{false, "MemTotal", &m.Total, false},
		{false, "MemFree", &m.Free, true},
		{false, "Slab", &m.Slab, true},
		{false, "SUnreclaim", &m.SUnreclaim, true},
		{false, "Shmem", &m.Shmem, true},
		{false, "KernelStack", &m.KernelStack, true},
		{false, "PageTables", &m.PageTables, true},
		{true, "RssAnon", &m.Anon, true},
	}
}

// parseMemory takes the Memory figures from the text of /proc/self/status
// and /proc/meminfo.
func parseMemory(status, meminfo []byte) (Memory, error) {
	var m Memory
	for _, f := range m.fields() {
		text, file := meminfo, procMeminfo
		if f.status {
			text, file = status, procStatus
		}
		v, err := kBField(text, f.key)
		var missing noFieldError
		switch {
		case f.optional && errors.As(err, &missing):
			v = -1 // an older or differently built kernel
		case err != nil:
			return Memory{}, fmt.Errorf("%s: %w", file, err)
		}
		*f.dst = v
	}
	return m, nil
}

// noFieldError is kBField's error for a key with no line.
type noFieldError struct{ key string }

func (e noFieldError) Error() string { return "no " + e.key + " line" }

// maxKB bounds a value: 1 PiB in kB, far above any VM, and far from
// overflowing when converted.
const maxKB = 1 << 40

// kBField returns the value of the line "KEY: N kB" in text (the format
// of /proc/self/status and /proc/meminfo: blanks after the colon). The key
// must appear exactly once; N must be a decimal number as the kernel
// writes it (digits, no sign, no leading zero) and at most maxKB.
func kBField(text []byte, key string) (int64, error) {
	var v int64 = -1
	for rest := text; len(rest) > 0; {
		var line []byte
		line, rest, _ = bytes.Cut(rest, []byte{'\n'})
		k, val, ok := bytes.Cut(line, []byte{':'})
		if !ok || string(k) != key {
			continue
		}
		if v >= 0 {
			return 0, fmt.Errorf("%s appears twice", key)
		}
		n, err := parseKB(val)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", key, err)
		}
		v = n
	}
	if v < 0 {
		return 0, noFieldError{key}
	}
	return v, nil
}

// parseKB reads " \t N kB" (what follows a key's colon).
func parseKB(val []byte) (int64, error) {
	num, ok := bytes.CutSuffix(bytes.TrimLeft(val, " \t"), []byte(" kB"))
	if !ok {
		return 0, fmt.Errorf("%q does not end in \" kB\"", clipText(val))
	}
	if len(num) == 0 || len(num) > 13 {
		return 0, fmt.Errorf("%q: want 1 to 13 digits", clipText(val))
	}
	for _, c := range num {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q: not a decimal number", clipText(val))
		}
	}
	if num[0] == '0' && len(num) > 1 {
		return 0, fmt.Errorf("%q: leading zero", clipText(val))
	}
	n, err := strconv.ParseInt(string(num), 10, 64)
	if err != nil || n > maxKB {
		return 0, fmt.Errorf("%q: out of range", clipText(val))
	}
	return n, nil
}

// clipText shortens malformed text quoted in an error.
func clipText(b []byte) []byte {
	if len(b) > 40 {
		return b[:40]
	}
	return b
}

// String gives the figures in MiB with one decimal, as the stats line
// shows them.
func (m Memory) String() string {
	s := fmt.Sprintf("VmHWM %s MiB, VmRSS %s MiB, MemAvailable %s MiB, MemTotal %s MiB", mib(m.HWM), mib(m.RSS), mib(m.Available), mib(m.Total))
	// Where MemTotal went, as far as the kernel says: what a VM size
	// that carries too few clients spends its memory on.
	var parts []string
	for _, f := range m.fields() {
		if f.optional && *f.dst >= 0 {
			parts = append(parts, f.key+" "+mib(*f.dst))
		}
	}
	if len(parts) > 0 {
		s += " (" + strings.Join(parts, ", ") + " MiB)"
	}
	return s
}

func mib(kb int64) string { return strconv.FormatFloat(float64(kb)/1024, 'f', 1, 64) }

// MemoryStats is the memory part of the periodic stats line
// (control.Controller.LogStats's extra): "memory: VmHWM 10.2 MiB, VmRSS
// 9.8 MiB, MemAvailable 4.1 MiB, MemTotal 19.5 MiB", or the reason it
// cannot say.
func MemoryStats() string {
	m, err := ReadMemory()
	if err != nil {
		return "memory: unknown (" + err.Error() + ")"
	}
	return "memory: " + m.String()
}
