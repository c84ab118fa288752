package cmd

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/lab/images"
)

func newLabImagesCmd() *cobra.Command {
	o := images.Options{}
	c := &cobra.Command{
		Use:    "images [NAME...]",
		Short:  "Build (or reuse) the image archives that real lab nodes import into containerd",
		Long:   "Builds docker-archive tars of " + strings.Join(images.Names(), ", ") + " (all by default) from local binaries, cached by a hash of their inputs, and prints one line per image: name, refs, size, cached or built. Needs root; the first build debootstraps a Debian base (network, a few minutes).",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.KubeBinDir == "" {
				o.KubeBinDir = os.Getenv("SINABRO_KUBE_BIN_DIR")
			}
			o.Names = args
			ctx, cancel := signalContext()
			defer cancel()
			imgs, err := images.Build(ctx, o, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			for _, img := range imgs {
				state := "built"
				if img.Cached {
					state = "cached"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%-10s %s %dMB %s %s\n", img.Name, strings.Join(img.Refs, ","), img.Size>>20, state, img.Archive)
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&o.KubeBinDir, "kube-bin-dir", "", "directory with pause, coredns, agnhost and kube-proxy (default $SINABRO_KUBE_BIN_DIR)")
	f.StringVar(&o.CacheDir, "cache-dir", images.DefaultCacheDir, "where archives and the Debian base are cached")
	f.StringVar(&o.Sinabro, "sinabro", "", "the static sinabro binary to put in the sinabro image (default: this executable)")
	return c
}
