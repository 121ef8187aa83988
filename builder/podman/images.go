package podman

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/containers/buildah/define"
	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/images"
	"github.com/containers/podman/v5/pkg/bindings/system"
	"github.com/containers/podman/v5/pkg/domain/entities/types"
	"github.com/containers/podman/v5/pkg/specgen"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

var _ engine.Engine = (*Service)(nil)

// Version returns the server's podman version.
func (s *Service) Version() (string, error) {
	v, err := system.Version(s.ctx, nil)
	if err != nil {
		return "", fmt.Errorf("podman version: %w", err)
	}
	return v.Server.Version, nil
}

// GraphRoot returns where the service stores images and containers.
func (s *Service) GraphRoot() (string, error) {
	info, err := system.Info(s.ctx, nil)
	if err != nil {
		return "", fmt.Errorf("podman info: %w", err)
	}
	return info.Store.GraphRoot, nil
}

// ImageExists reports whether name is in the image store.
func (s *Service) ImageExists(name string) (bool, error) {
	ok, err := images.Exists(s.ctx, name, nil)
	if err != nil {
		return false, fmt.Errorf("image exists %s: %w", name, err)
	}
	return ok, nil
}

// ImageLabels returns the labels of an image.
func (s *Service) ImageLabels(name string) (map[string]string, error) {
	img, err := images.GetImage(s.ctx, name, nil)
	if err != nil {
		return nil, fmt.Errorf("inspect image %s: %w", name, err)
	}
	return img.Labels, nil
}

// Import creates image ref from a root file system tarball; changes are
// Containerfile instructions (ENV, LABEL) applied to its configuration.
func (s *Service) Import(rootfs io.Reader, ref string, changes []string) error {
	opts := new(images.ImportOptions).WithReference(ref).WithChanges(changes)
	if _, err := images.Import(s.ctx, rootfs, opts); err != nil {
		return fmt.Errorf("import image %s: %w", ref, err)
	}
	return nil
}

// Build builds the image and returns its ID. The build has no network,
// uses cached layers, removes its intermediate containers and never pulls.
func (s *Service) Build(r engine.BuildRequest) (string, error) {
	epoch := r.Epoch
	opts := types.BuildOptions{BuildOptions: define.BuildOptions{
		ContextDirectory:        r.ContextDir,
		Output:                  r.Tag,
		Target:                  r.Target,
		Args:                    r.Args,
		Layers:                  true,
		OutputFormat:            define.OCIv1ImageManifest,
		RemoveIntermediateCtrs:  true,
		ForceRmIntermediateCtrs: true,
		PullPolicy:              define.PullNever,
		ConfigureNetwork:        define.NetworkDisabled,
		Timestamp:               &epoch,
		Out:                     r.Out,
		Err:                     r.Out,
		ReportWriter:            r.Out,
		CommonBuildOpts:         &define.CommonBuildOptions{Ulimit: engine.Ulimits()},
	}}
	report, err := images.Build(s.ctx, []string{filepath.Join(r.ContextDir, r.File)}, opts)
	if err != nil {
		return "", fmt.Errorf("podman build %s: %w", r.Tag, err)
	}
	return report.ID, nil
}

// ExportDir writes a tar stream of dir in image to w. It creates a
// container that never runs and removes it afterwards.
func (s *Service) ExportDir(image, dir string, w io.Writer) (err error) {
	spec := specgen.NewSpecGenerator(image, false)
	spec.Command = []string{"/nonexistent"} // created, never started
	ctr, err := containers.CreateWithSpec(s.ctx, spec, nil)
	if err != nil {
		return fmt.Errorf("create container from %s: %w", image, err)
	}
	defer func() {
		force, vols := true, true
		if _, rerr := containers.Remove(s.ctx, ctr.ID, &containers.RemoveOptions{Force: &force, Volumes: &vols}); rerr != nil && err == nil {
			err = fmt.Errorf("remove container %s: %w", ctr.ID, rerr)
		}
	}()
	copyFn, err := containers.CopyToArchive(s.ctx, ctr.ID, dir, w)
	if err == nil {
		err = copyFn()
	}
	if err != nil {
		return fmt.Errorf("copy %s out of %s: %w", dir, image, err)
	}
	return nil
}

// RemoveImage removes an image by name or ID; a missing image is no error.
func (s *Service) RemoveImage(name string) error {
	force := true
	_, errs := images.Remove(s.ctx, []string{name}, &images.RemoveOptions{Force: &force, Ignore: &force})
	if len(errs) > 0 {
		return fmt.Errorf("remove image %s: %w", name, errors.Join(errs...))
	}
	return nil
}

// PruneDangling removes the builder's untagged images (replaced stages,
// unreferenced layers) and returns how many it removed.
func (s *Service) PruneDangling() (int, error) {
	filters := map[string][]string{"dangling": {"true"}, "label": {engine.Label}}
	rep, err := images.Prune(s.ctx, &images.PruneOptions{Filters: filters})
	if err != nil {
		return 0, fmt.Errorf("prune dangling images: %w", err)
	}
	return len(rep), nil
}

// RemoveAll removes every image carrying Label, and first the containers
// using them, including buildah's working containers that an interrupted
// build leaves behind; it returns the number of images removed.
func (s *Service) RemoveAll() (int, error) {
	all := true
	list, err := images.List(s.ctx, &images.ListOptions{All: &all, Filters: map[string][]string{"label": {engine.Label}}})
	if err != nil {
		return 0, fmt.Errorf("list builder images: %w", err)
	}
	ours := map[string]bool{}
	for _, img := range list {
		ours[img.ID] = true
	}
	ctrs, err := containers.List(s.ctx, &containers.ListOptions{All: &all, External: &all})
	if err != nil {
		return 0, fmt.Errorf("list containers: %w", err)
	}
	for _, c := range ctrs {
		if !ours[c.ImageID] {
			continue
		}
		force := true
		if _, err := containers.Remove(s.ctx, c.ID, &containers.RemoveOptions{Force: &force}); err != nil {
			return 0, fmt.Errorf("remove container %s of a builder image: %w", c.ID, err)
		}
	}
	if len(list) == 0 {
		return 0, nil
	}
	// One request, so that podman orders children before their parents.
	ids := make([]string, 0, len(list))
	for _, img := range list {
		ids = append(ids, img.ID)
	}
	force := true
	if _, errs := images.Remove(s.ctx, ids, &images.RemoveOptions{Force: &force, Ignore: &force}); len(errs) > 0 {
		return 0, fmt.Errorf("remove builder images: %w", errors.Join(errs...))
	}
	return len(ids), nil
}
