package main

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// fakeStore is an in-memory xenstore with the behaviour the agent relies
// on from xenstored: Read and Directory of a missing node fail with
// ENOENT, Write creates parents (which then read as ""), a watch fires once
// at once and then for every write at or below its path, a lagging
// watcher loses events rather than blocking the writer, and Close ends
// every watch.
type fakeStore struct {
	mu      sync.Mutex
	nodes   map[string]string
	watches map[string]chan xenstore.Event // by token
	paths   map[string]string              // watched path, by token
}

var _ store = (*fakeStore)(nil)

func newFakeStore() *fakeStore {
	return &fakeStore{nodes: map[string]string{}, watches: map[string]chan xenstore.Event{}, paths: map[string]string{}}
}

func (f *fakeStore) Read(path string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.nodes[path]
	if !ok {
		return "", xenstore.ENOENT
	}
	return v, nil
}

func (f *fakeStore) Write(path, value string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for p := path; ; {
		i := strings.LastIndexByte(p, '/')
		if i <= 0 {
			break
		}
		p = p[:i]
		if _, ok := f.nodes[p]; !ok {
			f.nodes[p] = ""
		}
	}
	f.nodes[path] = value
	for tok, ch := range f.watches {
		if w := f.paths[tok]; path == w || strings.HasPrefix(path, w+"/") {
			select {
			case ch <- xenstore.Event{Path: path, Token: tok}:
			default: // dropped, as xenstore.Client does for a lagging watcher
			}
		}
	}
	return nil
}

func (f *fakeStore) Directory(path string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.nodes[path]; !ok {
		return nil, xenstore.ENOENT
	}
	var names []string
	for p := range f.nodes {
		if rest, ok := strings.CutPrefix(p, path+"/"); ok && !strings.Contains(rest, "/") {
			names = append(names, rest)
		}
	}
	slices.Sort(names)
	return names, nil
}

func (f *fakeStore) Watch(path, token string) (<-chan xenstore.Event, func(), error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan xenstore.Event, xenstore.WatchBuffer)
	ch <- xenstore.Event{Path: path, Token: token}
	f.watches[token], f.paths[token] = ch, path
	return ch, func() { f.unwatch(token) }, nil
}

func (f *fakeStore) unwatch(token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ch, ok := f.watches[token]; ok {
		close(ch)
		delete(f.watches, token)
	}
}

// Close ends every watch, as a failed connection does.
func (f *fakeStore) Close() {
	f.mu.Lock()
	toks := slices.Collect(maps.Keys(f.watches))
	f.mu.Unlock()
	for _, t := range toks {
		f.unwatch(t)
	}
}

// wait polls until path has a value and returns it.
func (f *fakeStore) wait(t *testing.T, path string, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if v, err := f.Read(path); err == nil {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not written within %v", path, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
