package podman

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

// The integration test needs a podman service (root, podman installed);
// `make test-builder` (part of `make test`) sets QGFW_TEST_PODMAN=1.
func requirePodman(t *testing.T) {
	t.Helper()
	if os.Getenv("QGFW_TEST_PODMAN") != "1" {
		t.Skip("podman integration test: set QGFW_TEST_PODMAN=1 (make test-builder) to run it against a real podman service")
	}
}

// rootfsTar returns a tarball holding only the static probe binary.
func rootfsTar(t *testing.T) []byte {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "probe")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build probe: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "probe", Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// exportFiles returns the regular files under /out of image.
func exportFiles(t *testing.T, svc *Service, image string) map[string]string {
	t.Helper()
	var exported bytes.Buffer
	if err := svc.ExportDir(image, "/out", &exported); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	tr := tar.NewReader(&exported)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = string(data)
		}
	}
}

func TestBuildFixture(t *testing.T) {
	requirePodman(t)
	ctx := context.Background()
	svc, err := Connect(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // runs last: cleanups run in reverse order
		if err := svc.Close(); err != nil {
			t.Error(err)
		}
	})
	if v, err := svc.Version(); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("podman server %s at %s (private %v)", v, svc.URI, svc.Private)
	}

	base := "localhost/qgfw-test-base:probe"
	tag := "localhost/qgfw-test-image:fixture"
	t.Cleanup(func() {
		for _, img := range []string{tag, base} {
			if err := svc.RemoveImage(img); err != nil {
				t.Error(err)
			}
		}
		if _, err := svc.PruneDangling(); err != nil {
			t.Error(err)
		}
	})
	if err := svc.Import(bytes.NewReader(rootfsTar(t)), base, []string{"LABEL " + engine.Label + "=test"}); err != nil {
		t.Fatal(err)
	}
	if ok, err := svc.ImageExists(base); err != nil || !ok {
		t.Fatalf("imported image %s exists = %v, %v", base, ok, err)
	}
	labels, err := svc.ImageLabels(base)
	if err != nil || labels[engine.Label] != "test" {
		t.Fatalf("labels of %s = %v, %v", base, labels, err)
	}

	var log bytes.Buffer
	id, err := svc.Build(engine.BuildRequest{
		ContextDir: "testdata/fixture",
		File:       "Containerfile",
		Tag:        tag,
		Args:       map[string]string{"BASE": base, "PROBE_ARG": "fixture-arg"},
		Epoch:      time.Unix(0, 0),
		Out:        &log,
	})
	t.Logf("build log:\n%s", log.String())
	if err != nil {
		t.Fatal(err)
	}
	if id == "" {
		t.Fatal("build returned no image ID")
	}

	files := exportFiles(t, svc, tag)
	if len(files) != 3 {
		t.Fatalf("exported files = %v, want out/{greeting,result,result.nonce}", files)
	}
	result := files["out/result"]
	// The ulimits passed with the build, no network inside the build (only
	// loopback), and the build argument.
	want := "nofile=1024:1024 interfaces=1 arg=fixture-arg\n"
	if result != want {
		t.Errorf("probe result = %q, want %q", result, want)
	}
	if g := files["out/greeting"]; g != "hello\n" {
		t.Errorf("greeting = %q", g)
	}

	// The pipeline builds a stage under its own tag first, then the whole
	// file; the second build must reuse the stage's layers, not rerun it.
	stageTag := "localhost/qgfw-test-image:stage"
	t.Cleanup(func() {
		if err := svc.RemoveImage(stageTag); err != nil {
			t.Error(err)
		}
	})
	args := map[string]string{"BASE": base, "PROBE_ARG": "stage-arg"}
	req := BuildRequestForTest("testdata/fixture", stageTag, "probe", args, &log)
	if _, err := svc.Build(req); err != nil {
		t.Fatal(err)
	}
	req.Tag, req.Target = tag, ""
	if _, err := svc.Build(req); err != nil {
		t.Fatal(err)
	}
	stage := exportFiles(t, svc, stageTag)
	whole := exportFiles(t, svc, tag)
	if stage["out/result.nonce"] == "" || stage["out/result.nonce"] != whole["out/result.nonce"] {
		t.Errorf("the whole build ran the cached stage again: nonce %q, then %q", stage["out/result.nonce"], whole["out/result.nonce"])
	}
}

func BuildRequestForTest(dir, tag, target string, args map[string]string, log io.Writer) engine.BuildRequest {
	return engine.BuildRequest{ContextDir: dir, File: "Containerfile", Tag: tag, Target: target, Args: args, Epoch: time.Unix(0, 0), Out: log}
}
