// Package docker implements the builder's container engine with the docker
// command-line client (`./build-with.sh docker`), for contributors who have
// docker rather than podman.
package docker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

// CLI runs the docker client; its methods implement engine.Engine with the
// corresponding docker commands.
type CLI struct {
	ctx context.Context
	bin string
}

var _ engine.Engine = (*CLI)(nil)

// Connect finds the docker client and checks that its engine answers.
func Connect(ctx context.Context) (*CLI, error) {
	bin, err := exec.LookPath("docker")
	if err != nil {
		return nil, fmt.Errorf("the docker command is not installed (or use ./build-with.sh podman): %w", err)
	}
	c := &CLI{ctx: ctx, bin: bin}
	if _, err := c.Version(); err != nil {
		return nil, fmt.Errorf("docker engine not reachable (is dockerd running and may this user use it?): %w", err)
	}
	return c, nil
}

// run executes docker with args and returns its output. Given out, the
// output goes there instead (and the error output too if log is set). A
// failure carries docker's error output.
func (c *CLI) run(stdin io.Reader, out io.Writer, log bool, args ...string) (string, error) {
	cmd := exec.CommandContext(c.ctx, c.bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdin = stdin
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if out != nil {
		cmd.Stdout = out
	}
	if log {
		cmd.Stderr = io.MultiWriter(out, &stderr)
	}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("docker %s: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

func (c *CLI) Name() string { return "docker" }

func (c *CLI) Version() (string, error) {
	return c.run(nil, nil, false, "version", "--format", "{{.Server.Version}}")
}

func (c *CLI) GraphRoot() (string, error) {
	return c.run(nil, nil, false, "info", "--format", "{{.DockerRootDir}}")
}

func (c *CLI) ImageExists(name string) (bool, error) {
	out, err := c.run(nil, nil, false, "image", "ls", "--quiet", name)
	return out != "", err
}

func (c *CLI) ImageLabels(name string) (map[string]string, error) {
	out, err := c.run(nil, nil, false, "image", "inspect", "--format", "{{json .Config.Labels}}", name)
	if err != nil {
		return nil, err
	}
	var labels map[string]string
	if err := json.Unmarshal([]byte(out), &labels); err != nil {
		return nil, fmt.Errorf("labels of %s: %w", name, err)
	}
	return labels, nil
}

func (c *CLI) Import(rootfs io.Reader, ref string, changes []string) error {
	args := []string{"import"}
	for _, ch := range changes {
		args = append(args, "--change", ch)
	}
	_, err := c.run(rootfs, nil, false, append(args, "-", ref)...)
	return err
}

func (c *CLI) Build(r engine.BuildRequest) (string, error) {
	args := []string{"build", "--file", filepath.Join(r.ContextDir, r.File), "--tag", r.Tag,
		"--network", "none", "--pull=false", "--rm", "--force-rm"}
	if r.Target != "" {
		args = append(args, "--target", r.Target)
	}
	for _, u := range engine.Ulimits() {
		args = append(args, "--ulimit", u)
	}
	keys := make([]string, 0, len(r.Args))
	for k := range r.Args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--build-arg", k+"="+r.Args[k])
	}
	if _, err := c.run(nil, r.Out, true, append(args, r.ContextDir)...); err != nil {
		return "", err
	}
	return c.run(nil, nil, false, "image", "inspect", "--format", "{{.Id}}", r.Tag)
}

func (c *CLI) ExportDir(image, dir string, w io.Writer) error {
	id, err := c.run(nil, nil, false, "create", image, "/nonexistent")
	if err != nil {
		return err
	}
	_, err = c.run(nil, w, false, "cp", id+":"+dir, "-")
	if _, rerr := c.run(nil, nil, false, "rm", "--force", id); err == nil {
		err = rerr
	}
	return err
}

func (c *CLI) RemoveImage(name string) error {
	if ok, err := c.ImageExists(name); err != nil || !ok {
		return err
	}
	_, err := c.run(nil, nil, false, "image", "rm", "--force", name)
	return err
}

func (c *CLI) PruneDangling() (int, error) {
	out, err := c.run(nil, nil, false, "image", "prune", "--force", "--filter", "label="+engine.Label)
	return strings.Count(out, "deleted:"), err
}

func (c *CLI) RemoveAll() (int, error) {
	out, err := c.run(nil, nil, false, "image", "ls", "--all", "--quiet", "--filter", "label="+engine.Label)
	if err != nil || out == "" {
		return 0, err
	}
	ids := strings.Fields(out)
	if _, err := c.run(nil, nil, false, append([]string{"image", "rm", "--force"}, ids...)...); err != nil {
		return 0, err
	}
	return len(ids), nil
}

func (c *CLI) Close() error { return nil }
