// The firewall module may depend only on the standard library,
// golang.org/x/sys and golang.org/x/net: it is the code users must be
// able to audit, and what goes into the image.
package firewall_test

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/qubes-go-firewall/qubes-go-firewall/firewall"

var allowed = []string{module, "golang.org/x/sys/", "golang.org/x/net/"}

func TestOnlyAllowedImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-test", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	var checked int
	for _, pkg := range strings.Fields(string(out)) {
		checked++
		ok := false
		for _, prefix := range allowed {
			if pkg == strings.TrimSuffix(prefix, "/") || strings.HasPrefix(pkg, prefix) {
				ok = true
				break
			}
		}
		// Test binaries get synthetic names like "pkg.test" and "pkg [pkg.test]".
		if !ok && !strings.HasPrefix(strings.TrimPrefix(pkg, "["), module) {
			t.Errorf("firewall module depends on %s: only the standard library, golang.org/x/sys and golang.org/x/net are allowed", pkg)
		}
	}
	if checked == 0 {
		t.Fatal("go list reported no packages")
	}
}

// The firewall binary contains no test scaffolding: fakes and in-memory
// servers live in packages named ...test (as net/http/httptest), which only
// tests and test tools import. AUDIT.md lists what the binary is made of.
func TestBinaryHasNoTestPackages(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", "./cmd/firewall").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasSuffix(pkg, "test") || strings.Contains(pkg, "/internal/") {
			t.Errorf("the firewall binary imports %s, test scaffolding", pkg)
		}
	}
}
