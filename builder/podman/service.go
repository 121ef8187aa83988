// Package podman drives a podman API service through podman's Go bindings:
// it finds or starts the service and offers the few image and container
// operations the image build needs.
package podman

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containers/podman/v5/pkg/bindings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

// containersConf configures a private service so that it works on hosts
// like the project's CI machine: runc (crun fails on hybrid cgroup layouts),
// lowered default ulimits, and no dependency on systemd or journald.
const containersConf = `[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
`

// Service is a connection to a podman API service; Close stops the service
// if Connect started it.
type Service struct {
	ctx     context.Context // carries the bindings connection
	URI     string
	Private bool // started by Connect, stopped by Close
	cmd     *exec.Cmd
	dir     string
	waitErr chan error
}

// Connect uses CONTAINER_HOST if set (and fails if it does not answer),
// else the default socket if it answers, else starts a private
// `podman system service` on a socket in a temporary directory.
func Connect(ctx context.Context, logf engine.Logf) (*Service, error) {
	if uri := os.Getenv("CONTAINER_HOST"); uri != "" {
		c, err := bindings.NewConnection(ctx, uri)
		if err != nil {
			return nil, fmt.Errorf("connect to CONTAINER_HOST %s: %w", uri, err)
		}
		return &Service{ctx: c, URI: uri}, nil
	}
	uri := defaultURI()
	if c, err := bindings.NewConnection(ctx, uri); err == nil {
		return &Service{ctx: c, URI: uri}, nil
	}
	return startPrivate(ctx, logf)
}

func defaultURI() string {
	if os.Geteuid() == 0 {
		return "unix:///run/podman/podman.sock"
	}
	dir := os.Getenv("XDG_RUNTIME_DIR")
	if dir == "" {
		dir = fmt.Sprintf("/run/user/%d", os.Geteuid())
	}
	return "unix://" + filepath.Join(dir, "podman", "podman.sock")
}

func startPrivate(ctx context.Context, logf engine.Logf) (*Service, error) {
	bin, err := exec.LookPath("podman")
	if err != nil {
		return nil, fmt.Errorf("no podman API socket answers and the podman command is not installed (apt-get install podman runc): %w", err)
	}
	dir, err := os.MkdirTemp("", "qgfw-podman-")
	if err != nil {
		return nil, fmt.Errorf("start podman service: %w", err)
	}
	conf := filepath.Join(dir, "containers.conf")
	if err := os.WriteFile(conf, []byte(containersConf), 0o644); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start podman service: %w", err)
	}
	uri := "unix://" + filepath.Join(dir, "podman.sock")
	logPath := filepath.Join(dir, "service.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start podman service: %w", err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "system", "service", "--time=0", uri)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+conf)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Own process group: an interrupt of qgfw must not kill the service
	// before Close has removed the build's containers.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s system service: %w", bin, err)
	}
	s := &Service{URI: uri, Private: true, cmd: cmd, dir: dir, waitErr: make(chan error, 1)}
	go func() { s.waitErr <- cmd.Wait() }()
	logf("started private podman service on %s", uri)
	started := time.Now()
	for delay := 50 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		c, err := bindings.NewConnection(ctx, uri)
		if err == nil {
			s.ctx = c
			return s, nil
		}
		select {
		case werr := <-s.waitErr:
			out, _ := os.ReadFile(logPath)
			os.RemoveAll(dir)
			return nil, fmt.Errorf("podman system service exited (%v): %s", werr, strings.TrimSpace(string(out)))
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		if delay == time.Second && time.Since(started) > time.Minute {
			s.Close()
			return nil, errors.New("podman system service did not answer within a minute")
		}
	}
}

// Name returns "podman".
func (s *Service) Name() string { return "podman" }

// Close stops a private service and removes its directory.
func (s *Service) Close() error {
	if !s.Private || s.cmd == nil {
		return nil
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.waitErr:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.waitErr
	}
	s.cmd = nil
	return os.RemoveAll(s.dir)
}
