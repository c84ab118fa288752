package cmd

import "github.com/spf13/cobra"

// TODO(owner of debug): replace this placeholder.
func newDebugCmd() *cobra.Command {
	return &cobra.Command{Use: "debug", Short: "debug (not yet implemented)", Hidden: true}
}
