//go:build !linux

package vchan

import "errors"

var errNoXen = errors.New("vchan: Xen devices are supported on Linux only")

func dialXen(server int, ref, remotePort uint32) (*Conn, error) { return nil, errNoXen }

func listenXen(client, leftOrder, rightOrder int) (*Conn, uint32, uint32, error) {
	return nil, 0, 0, errNoXen
}
