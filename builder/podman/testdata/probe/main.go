// Command probe runs inside a fixture build and records what the build
// environment looks like, so the integration test can check the options
// the driver passed.
package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
)

func main() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	ifaces, _ := net.Interfaces()
	out := fmt.Sprintf("nofile=%d:%d interfaces=%d arg=%s\n", lim.Cur, lim.Max, len(ifaces), os.Getenv("PROBE_ARG"))
	if err := os.MkdirAll(filepath.Dir(os.Args[1]), 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	if err := os.WriteFile(os.Args[1], []byte(out), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	// A nonce shows whether a later build ran this step again or reused
	// the cached layer.
	nonce, err := os.ReadFile("/proc/sys/kernel/random/uuid")
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	if err := os.WriteFile(os.Args[1]+".nonce", nonce, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	fmt.Print(out)
}
