package xenstore

import (
	"context"
	"errors"
	"fmt"
)

// ShutdownPath is where the toolstack asks a guest to shut down.
const ShutdownPath = "control/shutdown"

// WatchShutdown watches control/shutdown and sends each request the
// firewall can carry out ("poweroff", "halt" or "reboot") on the returned
// channel, after acknowledging it the way Linux does (drivers/xen/manage.c
// shutdown_handler): in one transaction, read the request and overwrite it
// with "". Other requests ("suspend", unknown words) are left unacknowledged
// and logged, which tells the toolstack they are unsupported.
//
// The guest kernel runs the same handler when built with CONFIG_XEN; both
// acknowledge in a transaction, so exactly one of them sees each request.
// If the kernel wins, it calls orderly_poweroff (which runs
// /proc/sys/kernel/poweroff_cmd) or ctrl_alt_del, and PID 1 must catch
// those instead (see docs/qubes-testing-xenstore.md).
//
// The channel holds one request and is closed when ctx ends or the
// connection fails.
func WatchShutdown(ctx context.Context, xs *Client, logf func(string, ...any)) (<-chan string, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	events, cancel, err := xs.Watch(ShutdownPath, "qgfw-shutdown")
	if err != nil {
		return nil, err
	}
	out := make(chan string, 1)
	go func() {
		defer close(out)
		defer cancel()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-events:
				if !ok {
					return
				}
			}
			req, err := takeShutdown(xs)
			if err != nil {
				logf("shutdown watch: %v", err)
				continue
			}
			if req == "" {
				continue
			}
			select {
			case out <- req:
			default: // one pending request is enough
			}
		}
	}()
	return out, nil
}

// takeShutdown reads and acknowledges a pending request; "" means none.
func takeShutdown(xs *Client) (string, error) {
	var req string
	err := xs.Transaction(func(tx *Tx) error {
		req = ""
		v, err := tx.Read(ShutdownPath)
		if errors.Is(err, ENOENT) || (err == nil && v == "") {
			return nil
		}
		if err != nil {
			return err
		}
		switch v {
		case "poweroff", "halt", "reboot":
			req = v
			return tx.Write(ShutdownPath, "")
		}
		return fmt.Errorf("unsupported request %q left unacknowledged", v)
	})
	return req, err
}
