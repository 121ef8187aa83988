// Command firewall is the qubes-go-firewall VM's only process: /init in the
// image, or an ordinary process on Linux for tests.
//
// This is the boot skeleton; the forwarding engine is wired in by later
// changes.
package main

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

func main() {
	fmt.Fprintf(os.Stderr, "qubes-go-firewall: started (pid %d)\n", os.Getpid())
	if os.Getpid() == 1 {
		// As /init there is nothing to run yet: power the VM off cleanly
		// rather than let the kernel panic when PID 1 exits.
		unix.Sync()
		if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
			fmt.Fprintf(os.Stderr, "qubes-go-firewall: poweroff: %v\n", err)
		}
		select {}
	}
}
