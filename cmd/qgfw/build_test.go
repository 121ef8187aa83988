package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

func buildRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestVersionJSON(t *testing.T) {
	code, out, errOut := buildRun(t, "version", "--json")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var v versionInfo
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("version --json output %q: %v", out, err)
	}
	if !strings.HasPrefix(v.Go, "go") || !strings.Contains(v.GoToolchain, "go1.") || !strings.Contains(v.BaseImage, "base.lock") {
		t.Errorf("version = %+v", v)
	}
}

func TestCompletion(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		code, out, errOut := buildRun(t, "completion", shell)
		if code != exitOK || !strings.Contains(out, "qgfw") {
			t.Errorf("completion %s: exit %d, %d bytes, %s", shell, code, len(out), errOut)
		}
	}
	// What the shell scripts call: subcommands, and the engine flag's values.
	if _, out, _ := buildRun(t, "__complete", "bu"); !strings.Contains(out, "build") {
		t.Errorf("completing 'bu': %q", out)
	}
	if _, out, _ := buildRun(t, "__complete", "build", "--engine", ""); !strings.Contains(out, "podman\ndocker\n") {
		t.Errorf("completing --engine: %q", out)
	}
}

func TestBuildUsage(t *testing.T) {
	if code, _, _ := buildRun(t, "build", "extra-arg"); code != exitUsage {
		t.Errorf("build with an argument: exit %d, want %d", code, exitUsage)
	}
	if code, _, _ := buildRun(t, "build", "--no-such-flag"); code != exitUsage {
		t.Errorf("build with an unknown flag: exit %d, want %d", code, exitUsage)
	}
	// An unknown engine fails before anything is fetched or built.
	code, _, errOut := buildRun(t, "build", "--engine", "lxc", "--source", "../..", "--cache", t.TempDir(), "--dist", t.TempDir())
	if code != exitFailure || !strings.Contains(errOut, `unknown container engine "lxc"`) {
		t.Errorf("unknown engine: exit %d, %s", code, errOut)
	}
}
