package docker

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

// fakeDocker puts a docker script on PATH that logs its arguments, one
// call per line, and answers like a docker client with a working engine
// (or, with down set, like one whose engine is absent).
func fakeDocker(t *testing.T, down bool) (logPath string) {
	t.Helper()
	dir := t.TempDir()
	logPath = filepath.Join(dir, "calls")
	exit := "0"
	if down {
		exit = "1"
	}
	script := `#!/bin/sh
echo "$*" >> ` + logPath + `
case "$1" in
version) [ ` + exit + ` = 0 ] || { echo "Cannot connect to the Docker daemon" >&2; exit 1; }; echo 24.0.7 ;;
create) echo ctr123 ;;
cp) printf 'tar-bytes' ;;
image) [ "$2" = inspect ] && echo sha256:feed ;;
esac
`
	if err := os.WriteFile(filepath.Join(dir, "docker"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return logPath
}

func TestConnectEngineDown(t *testing.T) {
	fakeDocker(t, true)
	_, err := Connect(context.Background())
	if err == nil || !strings.Contains(err.Error(), "docker engine not reachable") || !strings.Contains(err.Error(), "Cannot connect") {
		t.Fatalf("err = %v", err)
	}
}

func TestBuildAndExport(t *testing.T) {
	calls := fakeDocker(t, false)
	c, err := Connect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	id, err := c.Build(engine.BuildRequest{
		ContextDir: "/ctx", File: "Containerfile", Tag: "localhost/x:y", Target: "kernel",
		Args: map[string]string{"BASE": "b", "A": "1"}, Epoch: time.Unix(0, 0), Out: &log,
	})
	if err != nil || id != "sha256:feed" {
		t.Fatalf("Build = %q, %v", id, err)
	}
	var out bytes.Buffer
	if err := c.ExportDir("localhost/x:y", "/out", &out); err != nil || out.String() != "tar-bytes" {
		t.Fatalf("ExportDir = %q, %v", out.String(), err)
	}
	data, err := os.ReadFile(calls)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"version --format {{.Server.Version}}",
		"build --file /ctx/Containerfile --tag localhost/x:y --network none --pull=false --rm --force-rm --target kernel --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --build-arg A=1 --build-arg BASE=b /ctx",
		"image inspect --format {{.Id}} localhost/x:y",
		"create localhost/x:y /nonexistent",
		"cp ctr123:/out -",
		"rm --force ctr123",
	}
	if got := strings.Split(strings.TrimSpace(string(data)), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("docker calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
