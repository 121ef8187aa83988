package inputs

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"go/build"
	"go/parser"
	"go/token"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/mod/modfile"
	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb/dirhash"
)

// Module is one module version with its go.sum hashes.
type Module struct {
	Path, Version string
	ZipHash       string // h1: of the module zip ("" if go.sum has none)
	ModHash       string // h1: of its go.mod
}

// GoSum parses a go.sum file.
func GoSum(data []byte) (map[module.Version]*Module, error) {
	mods := map[module.Version]*Module{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 || !strings.HasPrefix(f[2], "h1:") {
			return nil, fmt.Errorf("go.sum line %d: malformed", n)
		}
		ver, isMod := strings.CutSuffix(f[1], "/go.mod")
		key := module.Version{Path: f[0], Version: ver}
		if err := module.Check(key.Path, key.Version); err != nil {
			return nil, fmt.Errorf("go.sum line %d: %w", n, err)
		}
		m := mods[key]
		if m == nil {
			m = &Module{Path: key.Path, Version: key.Version}
			mods[key] = m
		}
		if isMod {
			m.ModHash = f[2]
		} else {
			m.ZipHash = f[2]
		}
	}
	return mods, sc.Err()
}

// GoProxy is a file-based module proxy tree (GOPROXY=file://Dir) filled
// from a network proxy; every file is checked against go.sum hashes.
type GoProxy struct {
	Cache *Cache
	URL   string // e.g. https://proxy.golang.org
}

func (p *GoProxy) dir() string { return filepath.Join(p.Cache.Dir, "goproxy") }

// CachePaths returns where the cache keeps m's proxy files, relative to
// the cache directory and without extension (add .info, .mod, .zip).
func CachePaths(m module.Version) (string, error) {
	ep, err := module.EscapePath(m.Path)
	if err != nil {
		return "", err
	}
	ev, err := module.EscapeVersion(m.Version)
	if err != nil {
		return "", err
	}
	return "goproxy/" + ep + "/@v/" + ev, nil
}

func (p *GoProxy) files(m module.Version) (base, rel string, err error) {
	ep, err := module.EscapePath(m.Path)
	if err != nil {
		return "", "", err
	}
	ev, err := module.EscapeVersion(m.Version)
	if err != nil {
		return "", "", err
	}
	rel = ep + "/@v/" + ev
	return filepath.Join(p.dir(), filepath.FromSlash(rel)), rel, nil
}

// Ensure makes m's .info and .mod (and .zip when withZip) present and
// verified in the cache and returns the zip's path ("" without zip).
func (p *GoProxy) Ensure(ctx context.Context, m *Module, withZip bool) (string, error) {
	key := module.Version{Path: m.Path, Version: m.Version}
	base, rel, err := p.files(key)
	if err != nil {
		return "", fmt.Errorf("module %s@%s: %w", m.Path, m.Version, err)
	}
	name := m.Path + "@" + m.Version
	rePin := "update go.mod/go.sum to a version the proxy serves (go get " + m.Path + "@VERSION)"
	get := func(ext string, check func(string) error) error {
		if _, err := os.Stat(base + ext); err == nil && check(base+ext) == nil {
			return nil
		}
		if err := p.Cache.download(ctx, name+ext, strings.TrimSuffix(p.URL, "/")+"/"+rel+ext, base+ext, ""); err != nil {
			return fmt.Errorf("%w (if the proxy no longer serves it: %s)", err, rePin)
		}
		return check(base + ext)
	}
	noCheck := func(string) error { return nil }
	if err := get(".info", noCheck); err != nil {
		return "", err
	}
	if m.ModHash != "" {
		if err := get(".mod", func(f string) error { return CheckMod(f, name, m.ModHash) }); err != nil {
			return "", err
		}
	}
	if !withZip {
		return "", nil
	}
	if m.ZipHash == "" {
		return "", fmt.Errorf("module %s: go.sum has no hash of its zip (run go mod download %s)", name, m.Path)
	}
	if err := get(".zip", func(f string) error { return CheckZip(f, name, m.ZipHash) }); err != nil {
		return "", err
	}
	return base + ".zip", nil
}

// CheckMod checks a go.mod file against its go.sum hash.
func CheckMod(file, name, want string) error {
	got, err := dirhash.Hash1([]string{"go.mod"}, func(string) (io.ReadCloser, error) { return os.Open(file) })
	if err != nil {
		return fmt.Errorf("hash %s: %w", file, err)
	}
	if got != want {
		return fmt.Errorf("go.mod of %s: hash %s, go.sum says %s", name, got, want)
	}
	return nil
}

// CheckZip checks a module zip against its go.sum hash.
func CheckZip(file, name, want string) error {
	got, err := dirhash.HashZip(file, dirhash.Hash1)
	if err != nil {
		return fmt.Errorf("hash %s: %w", file, err)
	}
	if got != want {
		return fmt.Errorf("zip of %s: hash %s, pinned %s", name, got, want)
	}
	return nil
}

// Offline fills dst with a file proxy tree that lets `go build` of the
// given packages of the module in modDir run without network: the go.mod
// of every module in go.sum and the zips of the modules whose packages the
// build imports. It returns the modules whose zips it included and the
// main module's package directories (slash-separated, relative) the build
// uses.
func (p *GoProxy) Offline(ctx context.Context, modDir string, pkgs []string, dst string) ([]*Module, []string, error) {
	gomod, err := os.ReadFile(filepath.Join(modDir, "go.mod"))
	if err != nil {
		return nil, nil, fmt.Errorf("offline modules: %w", err)
	}
	mf, err := modfile.ParseLax("go.mod", gomod, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("offline modules: %w", err)
	}
	gosum, err := os.ReadFile(filepath.Join(modDir, "go.sum"))
	if err != nil && !os.IsNotExist(err) {
		return nil, nil, fmt.Errorf("offline modules: %w", err)
	}
	sums, err := GoSum(gosum)
	if err != nil {
		return nil, nil, fmt.Errorf("offline modules %s: %w", modDir, err)
	}
	selected := map[string]*Module{} // module path -> the version go.mod selects
	for _, r := range mf.Require {
		m := sums[r.Mod]
		if m == nil {
			return nil, nil, fmt.Errorf("offline modules: %s is required by %s/go.mod but missing from go.sum", r.Mod, modDir)
		}
		selected[r.Mod.Path] = m
	}
	// Every go.mod first: the go command may read any of them to load
	// the module graph. They are small; fetch them in parallel.
	var keys []module.Version
	for k, m := range sums {
		if m.ModHash != "" {
			keys = append(keys, k)
		}
	}
	bar := p.Cache.Progress.StartCount("Go modules' go.mod files", int64(len(keys)))
	err = parallel(ctx, keys, func(k module.Version) error {
		_, err := p.Ensure(ctx, sums[k], false)
		bar.Add(1)
		return err
	})
	bar.Done()
	if err != nil {
		return nil, nil, err
	}
	zips, local, err := p.closure(ctx, modDir, mf.Module.Mod.Path, pkgs, selected)
	if err != nil {
		return nil, nil, err
	}
	for k := range sums {
		if err := p.copyInto(dst, k, ".info", ".mod"); err != nil {
			return nil, nil, err
		}
	}
	for _, m := range zips {
		if err := p.copyInto(dst, module.Version{Path: m.Path, Version: m.Version}, ".zip"); err != nil {
			return nil, nil, err
		}
	}
	return zips, local, nil
}

func (p *GoProxy) copyInto(dst string, m module.Version, exts ...string) error {
	base, rel, err := p.files(m)
	if err != nil {
		return err
	}
	for _, ext := range exts {
		data, err := os.ReadFile(base + ext)
		if os.IsNotExist(err) {
			continue // no go.mod hash in go.sum: the go command will not ask
		}
		if err != nil {
			return err
		}
		out := filepath.Join(dst, filepath.FromSlash(rel+ext))
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(out, data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// closure walks the imports of pkgs (directories relative to modDir, in
// the main module) through the module's own packages and into the zips of
// the modules they import, and returns the modules providing them.
// Build constraints are ignored: including a module too many only costs a
// download; one too few would fail the offline build.
func (p *GoProxy) closure(ctx context.Context, modDir, modPath string, pkgs []string, selected map[string]*Module) ([]*Module, []string, error) {
	used := map[*Module]*zip.ReadCloser{}
	defer func() {
		for _, z := range used {
			z.Close()
		}
	}()
	seen := map[string]bool{}
	var local []string
	queue := []string{}
	for _, d := range pkgs {
		queue = append(queue, path.Join(modPath, filepath.ToSlash(d)))
	}
	for len(queue) > 0 {
		ip := queue[0]
		queue = queue[1:]
		if seen[ip] {
			continue
		}
		seen[ip] = true
		var imports []string
		var err error
		if rel, ok := strings.CutPrefix(ip, modPath); ok && (rel == "" || rel[0] == '/') {
			local = append(local, strings.TrimPrefix(rel, "/"))
			imports, err = dirImports(filepath.Join(modDir, filepath.FromSlash(rel)))
		} else if m := provider(ip, selected); m != nil {
			z := used[m]
			if z == nil {
				zf, zerr := p.Ensure(ctx, m, true)
				if zerr != nil {
					return nil, nil, zerr
				}
				if z, err = zip.OpenReader(zf); err != nil {
					return nil, nil, fmt.Errorf("open zip of %s: %w", m.Path, err)
				}
				used[m] = z
			}
			prefix := m.Path + "@" + m.Version + "/" + strings.TrimPrefix(strings.TrimPrefix(ip, m.Path), "/")
			imports, err = zipImports(z, strings.TrimSuffix(prefix, "/"))
		} else {
			continue // the standard library, or not provided by any module
		}
		if err != nil {
			return nil, nil, fmt.Errorf("imports of %s: %w", ip, err)
		}
		queue = append(queue, imports...)
	}
	var out []*Module
	for m := range used {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	sort.Strings(local)
	return out, local, nil
}

// provider returns the selected module with the longest path that is a
// prefix of the import path.
func provider(ip string, selected map[string]*Module) *Module {
	var best *Module
	for p, m := range selected {
		if (ip == p || strings.HasPrefix(ip, p+"/")) && (best == nil || len(p) > len(best.Path)) {
			best = m
		}
	}
	return best
}

// dirImports returns the imports of the non-test Go files in dir.
func dirImports(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.Type().IsRegular() || !isSource(e.Name()) {
			continue
		}
		src, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		imps, err := parseImports(e.Name(), src)
		if err != nil {
			return nil, err
		}
		out = append(out, imps...)
	}
	return out, nil
}

// zipImports returns the imports of the non-test Go files directly in
// directory dir of a module zip.
func zipImports(z *zip.ReadCloser, dir string) ([]string, error) {
	var out []string
	for _, f := range z.File {
		if path.Dir(f.Name) != dir || !isSource(path.Base(f.Name)) {
			continue
		}
		if f.UncompressedSize64 > 8<<20 {
			return nil, fmt.Errorf("%s: too large", f.Name)
		}
		rc, err := f.Open()
		if err != nil {
			return nil, err
		}
		src, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
		imps, err := parseImports(f.Name, src)
		if err != nil {
			return nil, err
		}
		out = append(out, imps...)
	}
	return out, nil
}

func isSource(name string) bool {
	return strings.HasSuffix(name, ".go") && !strings.HasSuffix(name, "_test.go")
}

// parseImports returns the imports of one Go source file.
func parseImports(name string, src []byte) ([]string, error) {
	f, err := parser.ParseFile(token.NewFileSet(), name, src, parser.ImportsOnly)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, is := range f.Imports {
		p, err := strconv.Unquote(is.Path.Value)
		if err != nil {
			return nil, err
		}
		if p != "C" && !build.IsLocalImport(p) {
			out = append(out, p)
		}
	}
	return out, nil
}

func parallel[T any](ctx context.Context, items []T, f func(T) error) error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		sem  = make(chan struct{}, 8)
	)
	for _, it := range items {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := f(it); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		return errs[0]
	}
	return nil
}
